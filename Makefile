# Two commands matter (README): `make demo` and `make test`. Both set everything up first.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
CACHE ?= $(HOME)/.cache/d2c
export D2C_CACHE := $(CACHE)
export GLOG_minloglevel := 2

.PHONY: setup targets demo test bench fuzz clean
setup: $(VENV)/.d2c-setup weights/yolov3-tiny.weights targets

# Deploy toolchains (OpenVINO, MNN, RKNN), each pinned in its own venv in $(CACHE)/targets; a venv whose
# stamp matches its pins is reused in about a second, a cold install takes about 5 minutes (RKNN: 5.8 GB).
targets: $(VENV)/.d2c-setup
	$(VPY) tools/setup_targets.py

# Idempotent and fast when done: each step is keyed on a stamp and checks what is there.
$(VENV)/.d2c-setup: pyproject.toml tools/setup.sh tools/build_caffe.sh tools/build_alexeyab.sh $(wildcard tools/caffe_perf/*)
	bash tools/setup.sh $(PY)
	touch $@

weights/yolov3-tiny.weights: tools/fetch_weights.py | $(VENV)/.d2c-setup
	$(VPY) tools/fetch_weights.py

demo: setup
	$(VENV)/bin/d2c convert /usr/share/darknet/cfg/yolov3-tiny.cfg weights/yolov3-tiny.weights -o out/yolov3-tiny
	$(VENV)/bin/d2c detect out/yolov3-tiny /usr/share/darknet/data/dog.jpg -o out/dog-detections.png

test: setup
	$(VPY) -m pytest -q -p no:cacheprovider tests

bench: setup
	$(VENV)/bin/d2c bench --json out/bench.json

fuzz: setup
	D2C_FUZZ_EXAMPLES=20000 $(VPY) -m pytest -q -p no:cacheprovider tests -k fuzz

clean:
	rm -rf out $(VENV)
