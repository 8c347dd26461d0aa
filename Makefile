# One entry point for developers and CI. `make test` is what CI runs (.ci/run).
PYTHON ?= python3

# pytest exits 5 when it collects no test; that alone is not a failure here.
PYTEST = $(PYTHON) -m pytest -q
pytest_ok_if_empty = status=0; $(PYTEST) $(1) || status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest: no tests collected"; status=0; fi; exit $$status

.PHONY: setup test test-fast services-up services-down

## install what this machine lacks: Debian packages, the package with its test extras, the Kafka jars
setup:
	deploy/local/setup

## everything, integration tests included (starts its own Kafka and Redis)
test: setup
	@$(call pytest_ok_if_empty,)

## the fast layer only: no Kafka, no Redis, nothing slow
test-fast:
	@$(call pytest_ok_if_empty,-m "not integration and not slow")

## Kafka on 127.0.0.1:9092 and Redis on 127.0.0.1:6379 (data in .local/), for local runs
services-up:
	deploy/local/kafka start
	deploy/local/redis start

services-down:
	deploy/local/kafka stop
	deploy/local/redis stop
