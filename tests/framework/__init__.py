"""What the tests, the benchmarks and `make demo` stand on: private libvirt daemons and remote-style hosts
(devhost), a stock-style cloud image built from Debian packages, a throwaway PostgreSQL server (pgserver). Not part of
the product: hvctl never imports it."""
