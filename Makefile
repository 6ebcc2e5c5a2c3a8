# ciliumpy. `make demo` and `make test` are the two commands a newcomer runs; both set the
# machine up first (idempotent). Everything here runs as root: it loads BPF programs and
# creates network namespaces.

VENV       := .venv
PY         := $(VENV)/bin/python
PIP        := $(VENV)/bin/pip
KREL       := $(shell uname -r)
HDR_BUILD  := /usr/src/linux-headers-6.1.0-56-amd64
HDR_COMMON := /usr/src/linux-headers-6.1.0-56-common
APT_PKGS   := python3-bpfcc bpfcc-tools libbpf1 linux-headers-amd64 python3-venv \
              iproute2 iputils-ping iperf3 procps iptables curl
STAMP      := $(VENV)/.setup-done
PROTOS     := $(wildcard hubble/proto/*/*.proto)
PROTO_STAMP := cilium_py/hubble/api/__init__.py
# The real peers (tools/go.mod) are built into a cache outside the clone, kept between
# clones: CILIUMPY_TOOLS is also where cilium_py looks for them.
TOOLS_CACHE ?= $(or $(CILIUMPY_TOOLS),/var/cache/ciliumpy)
TOOLS_BIN  := $(TOOLS_CACHE)/bin
TOOLS      := kube-apiserver kube-controller-manager kubectl kubelet
# The version the binaries report (/version, kubectl version): go build leaves it unset.
KUBE_VERSION := $(shell awk '$$1=="k8s.io/kubernetes" {print $$2}' tools/go.mod)
KUBE_MINOR := $(word 2,$(subst ., ,$(KUBE_VERSION)))
KUBE_LDFLAGS := $(foreach p,k8s.io/component-base/version k8s.io/client-go/pkg/version,\
                -X $(p).gitVersion=$(KUBE_VERSION) -X $(p).gitMajor=1 -X $(p).gitMinor=$(KUBE_MINOR) -X $(p).gitTreeState=clean)
GOENV      := GOMODCACHE=$(TOOLS_CACHE)/go/mod GOCACHE=$(TOOLS_CACHE)/go/build CGO_ENABLED=0 GOFLAGS=-mod=mod

.PHONY: setup tools test test-unit test-bpf test-netns demo bench clean-lab lint proto

setup: $(STAMP) bpffs headers $(PROTO_STAMP) tools

$(STAMP): pyproject.toml Makefile
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	# Debian's python, so the venv matches the interpreter python3-bpfcc was built for.
	test -x $(PY) || /usr/bin/python3 -m venv $(VENV)
	# Expose only Debian's bcc package, not all of dist-packages.
	ln -sfn /usr/lib/python3/dist-packages/bcc $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/bcc
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'
	$(PY) -c 'import bcc, pyroute2, scapy, grpc, grpc_tools, prometheus_client, numpy'
	touch $(STAMP)

# One `go build` for the Kubernetes commands so they share compilation; etcd (the release
# the pinned Kubernetes requires) on its own because its main package is named "server".
# The stamp holds a hash of go.mod and go.sum: a changed pin rebuilds, a fresh clone does not.
tools:
	@want=$$(cat tools/go.mod tools/go.sum | sha256sum | cut -c1-16); \
	if [ "$$(cat $(TOOLS_BIN)/.pins 2>/dev/null)" != "$$want" ]; then \
	  command -v go >/dev/null || { echo "make setup: Go is needed to build the Kubernetes peers (tools/go.mod)"; exit 1; }; \
	  echo "building $(TOOLS) etcd into $(TOOLS_BIN) (the first build takes a while)"; \
	  mkdir -p $(TOOLS_BIN) && cd tools && \
	  $(GOENV) go build -trimpath -ldflags "$(KUBE_LDFLAGS)" -o $(TOOLS_BIN)/ $(addprefix k8s.io/kubernetes/cmd/,$(TOOLS)) && \
	  $(GOENV) go build -trimpath -o $(TOOLS_BIN)/etcd go.etcd.io/etcd/server/v3 && \
	  echo "$$want" > $(TOOLS_BIN)/.pins; \
	fi

# The Hubble API stubs are generated, never committed: hubble/proto is the source.
proto: $(STAMP)
	$(PY) -m cilium_py.hubble.protogen

$(PROTO_STAMP): $(PROTOS) $(STAMP)
	$(PY) -m cilium_py.hubble.protogen

# BCC compiles against the running kernel's headers; Debian ships 6.1 headers for any
# kernel, so point the running kernel's build/source links at them when missing.
headers:
	@if [ ! -e /lib/modules/$(KREL)/build ]; then \
	  mkdir -p /lib/modules/$(KREL); \
	  ln -sfn $$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -1) /lib/modules/$(KREL)/build; \
	  ln -sfn $$(ls -d /usr/src/linux-headers-*-common | sort -V | tail -1) /lib/modules/$(KREL)/source; \
	fi

bpffs:
	@mount | grep -q ' /sys/fs/bpf type bpf' || mount -t bpf bpf /sys/fs/bpf

test: setup
	$(PY) -m pytest -ra tests

test-unit: setup
	$(PY) -m pytest -ra tests/unit

demo: setup
	$(PY) -m cilium_py.lab.demo

bench: setup
	$(PY) -m bench

# Removes lab namespaces and pins left by an interrupted run (only ours: cpy-*, ciliumpy*).
clean-lab:
	-$(PY) -m cilium_py.lab.cleanup
