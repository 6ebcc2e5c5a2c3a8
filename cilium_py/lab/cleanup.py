"""Removes what an interrupted lab, demo or test run left: network namespaces named cpy-*,
and bpffs directories of ours. Only names this project creates are touched."""

from __future__ import annotations

import glob
import shutil

from cilium_py.datapath import netns
from cilium_py.lab.node import NS_PREFIX

BPF_GLOBS = ("/sys/fs/bpf/ciliumpy-test*", "/sys/fs/bpf/ciliumpy-demo*", "/sys/fs/bpf/ciliumpy-bench*")


def main() -> None:
    for name in netns.list_names(NS_PREFIX):
        netns.remove(name)
        print(f"removed network namespace {name}")
    for pattern in BPF_GLOBS:
        for path in glob.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)
            print(f"removed {path}")


if __name__ == "__main__":
    main()
