"""Servers and stand-ins shared by the tests and the benchmarks: the Horizon stand-in, a TCP proxy that can cut or
stall a connection, a throwaway redis-server. Neither tests/ nor bench/ is imported from here, and bench/ imports
this package instead of tests/."""
