"""Experiments that sit on top of the library (testbed, IMDb, ...). Nothing below imports these."""
