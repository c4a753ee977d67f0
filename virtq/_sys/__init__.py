"""The only place with libc bindings, ioctl numbers and constants missing from the stdlib.

Everything here is a thin, typed wrapper; policy lives in the layers above.
"""
