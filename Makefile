# The two commands of the README. Both run as root and set up what they need.
.PHONY: setup demo test bench deb

setup:
	./packaging/dev-setup.sh

demo: setup
	.venv/bin/tollgate demo

test: setup
	./tests/run.sh

bench: setup
	.venv/bin/python -m bench

deb:
	./packaging/build-deb.sh
