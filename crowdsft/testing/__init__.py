"""A kit for tests and benchmarks: the SIGKILL crash harness (``crash``), the load test
(``load``) and a model-free stand-in model space (``standin``). Product code never imports it."""
