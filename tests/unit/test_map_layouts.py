"""The numpy batch layouts are derived from the ctypes mirrors (maps/base.numpy_dtype):
for every LB struct, the same field names, offsets, size and byte order, checked by packing
values on one side and reading them on the other. No privileges needed."""

from __future__ import annotations

import ctypes
import inspect

import numpy as np
import pytest

from cilium_py.agent.services import writer
from cilium_py.datapath.maps import lb
from cilium_py.datapath.maps.base import be32, numpy_dtype

LB_STRUCTS = sorted((obj for _, obj in inspect.getmembers(lb, inspect.isclass)
                     if issubclass(obj, ctypes.Structure) and obj.__module__ == lb.__name__),
                    key=lambda cls: cls.__name__)


def distinct_values(struct: type) -> dict:
    """A value per field whose bytes all differ, so a wrong offset or a swapped byte order
    reads back as a different number."""
    values, seed = {}, 1
    for name, ctype in struct._fields_:
        if issubclass(ctype, ctypes.Array):
            values[name] = [(seed + i) & 0xFF for i in range(ctype._length_)]
            seed += ctype._length_
        else:
            size = ctypes.sizeof(ctype)
            values[name] = int.from_bytes(bytes((seed + i) & 0xFF for i in range(size)), "big")
            seed += size
    return values


def test_every_lb_struct_is_covered():
    names = {cls.__name__ for cls in LB_STRUCTS}
    assert {"Lb4Key", "Lb4Service", "Lb4Backend", "Lb4ReverseNat"} <= names
    assert len(LB_STRUCTS) >= 8


@pytest.mark.parametrize("struct", LB_STRUCTS, ids=lambda cls: cls.__name__)
def test_dtype_matches_the_ctypes_layout(struct):
    dtype = numpy_dtype(struct)
    assert dtype.itemsize == ctypes.sizeof(struct)
    assert list(dtype.names) == [name for name, _ in struct._fields_]
    for name, ctype in struct._fields_:
        assert dtype.fields[name][1] == getattr(struct, name).offset, name
        assert dtype[name].itemsize == ctypes.sizeof(ctype), name
        if getattr(ctype, "__ctype_be__", None) is ctype and ctypes.sizeof(ctype) > 1:
            assert dtype[name].byteorder == ">", f"{name} is big-endian in the mirror"


@pytest.mark.parametrize("struct", LB_STRUCTS, ids=lambda cls: cls.__name__)
def test_values_round_trip_between_ctypes_and_numpy(struct):
    dtype = numpy_dtype(struct)
    values = distinct_values(struct)
    # ctypes packs, numpy reads.
    packed = struct()
    for name, value in values.items():
        if isinstance(value, list):
            getattr(packed, name)[:] = value
        else:
            setattr(packed, name, value)
    record = np.frombuffer(bytes(packed), dtype)[0]
    for name, value in values.items():
        assert np.asarray(record[name]).tolist() == value, name
    # numpy packs, ctypes reads: the direction the batch writer uses.
    rows = np.zeros(2, dtype)
    for name, value in values.items():
        rows[name][1] = value
    back = struct.from_buffer_copy(rows.tobytes(), dtype.itemsize)
    for name, value in values.items():
        got = getattr(back, name)
        assert (list(got) if isinstance(value, list) else got) == value, name


def test_the_writer_packs_with_the_derived_layouts():
    assert writer.LB4_KEY == numpy_dtype(lb.Lb4Key)
    assert writer.LB4_SERVICE == numpy_dtype(lb.Lb4Service)
    assert writer.LB4_BACKEND == numpy_dtype(lb.Lb4Backend)
    assert writer.LB4_REVNAT == numpy_dtype(lb.Lb4ReverseNat)


def test_layouts_numpy_cannot_express_are_refused_by_name():
    class Flags(ctypes.Structure):
        _fields_ = [("low", ctypes.c_uint32, 3), ("high", ctypes.c_uint32, 29)]

    with pytest.raises(TypeError, match="Flags has no numpy equivalent"):
        numpy_dtype(Flags)
    with pytest.raises(TypeError, match="not a ctypes Structure"):
        numpy_dtype(be32)


def test_packed_structs_keep_their_offsets():
    class Packed(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("proto", ctypes.c_uint8), ("address", be32)]

    dtype = numpy_dtype(Packed)
    assert (dtype.itemsize, dtype.fields["address"][1], dtype["address"].byteorder) == (5, 1, ">")
