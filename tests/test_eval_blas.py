"""evaluate/blas.py: the library rule, and every routed operation equal to torch's own (products of row- and
column-major operands, the in-place Cholesky of either triangle, triangular solves on transposed views)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mocobench.evaluate import blas


@pytest.fixture
def openblas():
    before = blas.current()
    blas.use("openblas")
    yield
    blas.use(before)


def test_auto_is_openblas_on_amd_and_torch_elsewhere(monkeypatch):
    monkeypatch.setattr(blas, "cpu_vendor", lambda: "AuthenticAMD")
    assert blas.resolve("auto") == "openblas"
    monkeypatch.setattr(blas, "cpu_vendor", lambda: "GenuineIntel")
    assert blas.resolve("auto") == "torch"
    assert blas.resolve("torch") == "torch" and blas.resolve("openblas") == "openblas"
    with pytest.raises(ValueError, match="unknown BLAS library 'mkl'"):
        blas.resolve("mkl")


def test_cpu_vendor_is_read_from_cpuinfo():
    vendor = blas.cpu_vendor()
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        assert vendor == ""
    else:
        assert f"vendor_id\t: {vendor}" in text or vendor == ""


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_products_through_openblas_equal_torch_on_any_layout(openblas, dtype):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(7, 30, generator=g, dtype=torch.float64).to(dtype)
    Z = torch.randn(30, 11, generator=g, dtype=torch.float64).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    cases = [(A, Z), (A, Z.T.contiguous().T), (Z.T, A.T), (A[:, ::2], Z[::2]), (Z.T, Z)]
    for a, b in cases:
        out = blas.matmul(a, b)
        assert out.dtype == dtype and torch.allclose(out, a @ b, rtol=tol, atol=tol)
    gram = blas.matmul(Z, Z.T)  # one syrk: both triangles filled
    assert torch.allclose(gram, Z @ Z.T, rtol=tol, atol=tol) and torch.equal(gram, gram.T)


def test_openblas_threads_follow_torch_threads(openblas):
    from threadpoolctl import threadpool_info
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            blas.matmul(torch.ones(3, 3), torch.ones(3, 3))
            assert {i["num_threads"] for i in threadpool_info() if i["internal_api"] == "openblas"} == {n}
    finally:
        torch.set_num_threads(before)


def test_every_openblas_of_a_fresh_process_gets_torch_threads():
    """numpy's and scipy's OpenBLAS are two libraries: a product before scipy is loaded must not leave scipy's
    Cholesky on its default threads."""
    code = ("import torch; from mocobench.evaluate import blas; from threadpoolctl import threadpool_info\n"
            "torch.set_num_threads(1); blas.use('openblas'); blas.matmul(torch.ones(3, 3), torch.ones(3, 3))\n"
            "M = torch.eye(4, dtype=torch.float64)[None].repeat(2, 1, 1).contiguous(); blas.cholesky_lower(M)\n"
            "libs = [i for i in threadpool_info() if i['internal_api'] == 'openblas']\n"
            "print(len({i['filepath'] for i in libs}), sorted({i['num_threads'] for i in libs}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OPENBLAS_NUM_THREADS": "2"}).stdout.split()
    assert out[1:] == ["[1]"], out


def spd_batch(b, s, seed):
    X = torch.randn(b, s, s + 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return X @ X.mT + torch.eye(s, dtype=torch.float64)


@pytest.mark.parametrize("from_lower", [False, True])
def test_openblas_cholesky_in_place_reads_one_triangle_and_solves_like_torch(openblas, from_lower):
    M = spd_batch(3, 9, seed=1)
    ref = torch.linalg.cholesky(M)
    nan = torch.full_like(M, float("nan"))  # the triangle not read may hold anything
    work = torch.tril(M) + torch.triu(nan, 1) if from_lower else torch.triu(M) + torch.tril(nan, -1)
    L = blas.cholesky_lower(work, from_lower=from_lower)
    assert L.data_ptr() == work.data_ptr()  # in place
    assert torch.allclose(torch.tril(L.nan_to_num()), ref, rtol=1e-12, atol=1e-12)
    rhs = torch.randn(3, 9, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = blas.solve_triangular(L.mT, blas.solve_triangular(L, rhs, upper=False), upper=True)
    assert torch.allclose(x, torch.linalg.solve(M, rhs), rtol=1e-9, atol=1e-9)


def test_openblas_cholesky_rejects_an_indefinite_matrix(openblas):
    M = spd_batch(2, 5, seed=3)
    M[1, 2, 2] = -1.0
    with pytest.raises(torch.linalg.LinAlgError, match="matrix 1 of the batch"):
        blas.cholesky_lower(M)


@pytest.mark.parametrize("upper", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_openblas_triangular_solves_equal_torch(openblas, upper, transposed):
    g = torch.Generator().manual_seed(4)
    T = torch.randn(2, 6, 6, generator=g, dtype=torch.float64) + 6 * torch.eye(6, dtype=torch.float64)
    L = T.mT if transposed else T  # row- or column-major; the other triangle holds junk, never read
    B = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    ref = torch.linalg.solve_triangular(torch.triu(L) if upper else torch.tril(L), B, upper=upper)
    assert torch.allclose(blas.solve_triangular(L, B, upper=upper), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_openblas_eigh_is_an_eigendecomposition_with_torchs_eigenvalues(openblas, dtype):
    g = torch.Generator().manual_seed(5)
    F = torch.randn(40, 12, generator=g, dtype=torch.float64)
    A = (F.T @ F).to(dtype)
    lam, V = blas.eigh(A)
    assert lam.dtype == V.dtype == dtype and V.shape == (12, 12)
    eps = 1e-4 if dtype == torch.float32 else 1e-10
    assert torch.allclose(lam, torch.linalg.eigvalsh(A), rtol=eps, atol=eps * float(lam.abs().max()))
    assert bool((lam[1:] >= lam[:-1]).all())  # ascending, as torch's
    assert torch.allclose(V.T @ V, torch.eye(12, dtype=dtype), atol=eps)
    assert torch.allclose(A @ V, V * lam, atol=eps * float(lam.abs().max()))


def test_other_devices_and_dtypes_stay_with_torch(openblas):
    a = torch.arange(6, dtype=torch.int64).reshape(2, 3)
    assert torch.equal(blas.matmul(a, a.T), a @ a.T)
    L = torch.eye(3, dtype=torch.float32)[None]
    assert torch.equal(blas.solve_triangular(L, torch.ones(1, 3, 2), upper=False), torch.ones(1, 3, 2))
