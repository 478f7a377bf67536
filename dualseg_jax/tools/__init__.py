"""Tools that exercise the method from outside, beside the library rather than part of it: the
reader fuzzer, the kill/resume and operational-fault checkers, and the benchmarks. Only `launch/`
and the tests import them; nothing in the method imports a tool."""
