"""The shared core every stage imports: config, errors, distributed, records, atomic I/O, images, data."""
