# The two commands: `make run` (the portal with its demo model, on http://127.0.0.1:7860)
# and `make test` (the whole test suite). Both set up everything they need first.
.PHONY: run test bench setup setup-test

run: setup
	.venv/bin/llamaboard-portal demo

test: setup-test
	.venv/bin/python -m pytest

bench: setup-test
	.venv/bin/python bench/run_all.py

setup:
	bash scripts/setup.sh

setup-test:
	bash scripts/setup.sh --test
