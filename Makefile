# One entry point for developers and CI. `make test` is what CI runs (.ci/run).
PYTHON ?= python3

# pytest exits 5 when it collects no test; that alone is not a failure here.
# The suite runs on two pytest-xdist workers (each with its own Kafka and Redis;
# most of an integration test is waiting): 8 min on a 2-core Xeon, 11.5-12.5 on a
# 2-core AMD EPYC, against ~19 there in one process (TEST_WORKERS=0).
TEST_WORKERS ?= 2
PYTEST = $(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist worksteal
pytest_ok_if_empty = status=0; $(PYTEST) $(1) || status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest: no tests collected"; status=0; fi; exit $$status

.PHONY: setup demo test test-fast audit services-up services-down distill-demo

## install what this machine lacks: Debian packages, the package with its test extras, the Kafka jars
setup:
	deploy/local/setup

## the whole loop on this machine: services, simulator, seed model, workers, live progress (README)
DEMO_ARGS ?=
demo: setup
	$(PYTHON) -m pgkd.cli demo --no-setup $(DEMO_ARGS)

## everything, integration tests included (starts its own Kafka and Redis)
test: setup
	@$(call pytest_ok_if_empty,)

## the fast layer only: no Kafka, no Redis, nothing slow
test-fast:
	@$(call pytest_ok_if_empty,-m "not integration and not slow")

## known vulnerabilities in the installed dependencies (pip-audit; accepted ones in deploy/audit-ignore.txt):
## fails on a finding, warns (the audit did not run) when no vulnerability service answers
audit: setup
	$(PYTHON) deploy/audit.py

## Kafka on 127.0.0.1:9092 and Redis on 127.0.0.1:6379 (data in .local/), for local runs
services-up:
	deploy/local/kafka start
	deploy/local/redis start
	$(PYTHON) -m pgkd.cli topics create  # the broker auto-creates none (docs/TOPICS.md)

services-down:
	deploy/local/kafka stop
	deploy/local/redis stop

## PGKD on Banking77 against the teacher SIMULATOR (batch job; see README)
DATASETS ?= ../shared/datasets
DEMO_OUT ?= runs/b77
SIM_PORT ?= 8089
DISTILL_ARGS ?= --max-length 64 --lr 1e-4 --epochs 12 --cycle-epochs 4 --train-patience 3 --max-cycles 5
distill-demo:
	pgkd split --data $(DATASETS)/banking77/train.csv --test $(DATASETS)/banking77/test.csv \
		--text-col text --label-col category --n-test 1000 --out $(DEMO_OUT)
	pgkd teacher-sim --pool $(DEMO_OUT)/pool.csv --text-col text --label-col label --port $(SIM_PORT) & sim=$$!; \
		trap 'kill $$sim 2>/dev/null' EXIT; \
		pgkd distill --train $(DEMO_OUT)/train.csv --val $(DEMO_OUT)/val.csv --test $(DEMO_OUT)/test.csv \
			--teacher-url http://127.0.0.1:$(SIM_PORT)/v1 --teacher-model teacher-sim --out $(DEMO_OUT) $(DISTILL_ARGS)
