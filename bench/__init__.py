"""fastgpt benchmarks and measuring tools: pytest-benchmark suite, memory model, roofline, reports."""
