"""fastgpt's measuring tools: the pytest-benchmark suite, the compile report
(`python -m bench.compile_report`), the memory model (`python -m bench.memory`), the roofline and
the report (`python -m bench.report`)."""
