"""fastgpt's measuring tools: the compile report (`python -m bench.compile_report`) and benchmarks."""
