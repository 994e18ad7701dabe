"""The one map-access layer: libbpf (libbpf.so.1) through ctypes. Pinned objects, map info,
batched reads/writes/deletes, and BPF_PROG_TEST_RUN. BCC compiles and loads programs; every
map read and write of the agent goes through `RawMap`."""
from __future__ import annotations

import ctypes as ct
import errno
import os
from typing import Iterator, List, Mapping, Optional, Sequence, Tuple

def _load_libbpf():
    # libbpf 1.x (Debian 12, Ubuntu 24.04) or 0.x (Ubuntu 22.04): the calls used here
    # exist in both.
    for name in ("libbpf.so.1", "libbpf.so.0"):
        try:
            return ct.CDLL(name, use_errno=True)
        except OSError:
            continue
    raise OSError("libbpf is not installed (Debian/Ubuntu package libbpf1 or libbpf0)")


_lib = _load_libbpf()

_lib.bpf_obj_get.argtypes = [ct.c_char_p]
_lib.bpf_obj_get.restype = ct.c_int
_lib.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
_lib.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
_lib.bpf_prog_get_fd_by_id.argtypes = [ct.c_uint32]
_lib.bpf_map_get_fd_by_id.argtypes = [ct.c_uint32]
_lib.bpf_map_lookup_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
_lib.bpf_map_update_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_uint64]
_lib.bpf_map_delete_elem.argtypes = [ct.c_int, ct.c_void_p]
_lib.bpf_map_get_next_key.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
_lib.bpf_map_update_batch.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p,
                                      ct.POINTER(ct.c_uint32), ct.c_void_p]
_lib.bpf_map_delete_batch.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32),
                                      ct.c_void_p]
_lib.bpf_map_lookup_batch.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_void_p,
                                      ct.c_void_p, ct.POINTER(ct.c_uint32), ct.c_void_p]


class BpfError(OSError):
    pass


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = -rc if rc != -1 else ct.get_errno()
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return rc


class MapInfo(ct.Structure):
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32),
                ("map_flags", ct.c_uint32), ("name", ct.c_char * 16),
                ("rest", ct.c_uint8 * 64)]


class TestRunOpts(ct.Structure):
    _fields_ = [("sz", ct.c_size_t), ("data_in", ct.c_void_p), ("data_out", ct.c_void_p),
                ("data_size_in", ct.c_uint32), ("data_size_out", ct.c_uint32),
                ("ctx_in", ct.c_void_p), ("ctx_out", ct.c_void_p),
                ("ctx_size_in", ct.c_uint32), ("ctx_size_out", ct.c_uint32),
                ("retval", ct.c_uint32), ("repeat", ct.c_int), ("duration", ct.c_uint32),
                ("flags", ct.c_uint32), ("cpu", ct.c_uint32), ("batch_size", ct.c_uint32)]


class XdpMd(ct.Structure):
    _fields_ = [("data", ct.c_uint32), ("data_end", ct.c_uint32), ("data_meta", ct.c_uint32),
                ("ingress_ifindex", ct.c_uint32), ("rx_queue_index", ct.c_uint32),
                ("egress_ifindex", ct.c_uint32)]


_lib.bpf_prog_test_run_opts.argtypes = [ct.c_int, ct.POINTER(TestRunOpts)]

PERCPU_TYPES = {5, 6, 10}   # percpu hash, percpu array, lru percpu hash
BATCH_TYPES = {1, 2, 5, 6, 9, 10}   # map types with batch operations (not LPM trie)
ARRAY_TYPES = {2, 6}                # array, percpu array: every key exists, none deletes


def possible_cpus() -> int:
    with open("/sys/devices/system/cpu/possible") as f:
        n = 0
        for part in f.read().strip().split(","):
            lo, _, hi = part.partition("-")
            n = max(n, int(hi or lo) + 1)
        return n


NR_CPUS = possible_cpus()


def obj_pin(fd: int, path: str) -> None:
    _check(_lib.bpf_obj_pin(fd, path.encode()), f"pin {path}")


BPF_MAP_TYPE_ARRAY = 2


def map_create(map_type: int, name: str, key_size: int, value_size: int,
               max_entries: int) -> int:
    """A new map (the caller's fd), for the agent's own pins (agent/digest.py)."""
    if hasattr(_lib, "bpf_map_create"):         # libbpf >= 0.7
        _lib.bpf_map_create.argtypes = [ct.c_int, ct.c_char_p, ct.c_uint32, ct.c_uint32,
                                        ct.c_uint32, ct.c_void_p]
        rc = _lib.bpf_map_create(map_type, name.encode(), key_size, value_size,
                                 max_entries, None)
    else:
        _lib.bpf_create_map_name.argtypes = [ct.c_int, ct.c_char_p, ct.c_int, ct.c_int,
                                             ct.c_int, ct.c_uint32]
        rc = _lib.bpf_create_map_name(map_type, name.encode(), key_size, value_size,
                                      max_entries, 0)
    return _check(rc, f"create map {name}")


def obj_get(path: str) -> int:
    return _check(_lib.bpf_obj_get(path.encode()), f"open pinned {path}")


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    n = ct.c_uint32(ct.sizeof(info))
    _check(_lib.bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(n)), "map info")
    return info


class ProgInfo(ct.Structure):
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("tag", ct.c_uint8 * 8),
                ("jited_prog_len", ct.c_uint32), ("xlated_prog_len", ct.c_uint32),
                ("jited_prog_insns", ct.c_uint64), ("xlated_prog_insns", ct.c_uint64),
                ("load_time", ct.c_uint64), ("created_by_uid", ct.c_uint32),
                ("nr_map_ids", ct.c_uint32), ("map_ids", ct.c_uint64),
                ("name", ct.c_char * 16),
                # ifindex .. prog_tags (struct bpf_prog_info, offsets 80..191)
                ("_skip", ct.c_uint8 * 112),
                # counted only while BPF statistics are enabled (agent/bpfstats.py)
                ("run_time_ns", ct.c_uint64), ("run_cnt", ct.c_uint64),
                ("rest", ct.c_uint8 * 32)]


def prog_info(fd: int) -> ProgInfo:
    info = ProgInfo()
    n = ct.c_uint32(ct.sizeof(info))
    _check(_lib.bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(n)), "program info")
    return info


def prog_info_id(fd: int) -> int:
    """The kernel's id of a loaded program (what netlink reports as attached)."""
    return prog_info(fd).id


def prog_map_ids(fd: int) -> List[int]:
    """The ids of the maps a loaded program uses (how an adopted program's unpinned maps,
    such as the monitor's ring, are found again)."""
    n = prog_info(fd).nr_map_ids
    ids = (ct.c_uint32 * max(n, 1))()
    info = ProgInfo(nr_map_ids=n, map_ids=ct.addressof(ids))
    size = ct.c_uint32(ct.sizeof(info))
    _check(_lib.bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)), "program map ids")
    return list(ids[:min(n, info.nr_map_ids)])


def map_fd_by_id(map_id: int) -> int:
    return _check(_lib.bpf_map_get_fd_by_id(map_id), f"map id {map_id}")


def prog_name_by_id(prog_id: int) -> str:
    fd = prog_fd_by_id(prog_id)
    try:
        return prog_info(fd).name.decode(errors="replace")
    finally:
        os.close(fd)


def prog_fd_by_id(prog_id: int) -> int:
    return _check(_lib.bpf_prog_get_fd_by_id(prog_id), f"program id {prog_id}")


def test_run(prog_fd: int, packet: bytes, ifindex: int = 0, repeat: int = 1,
             out_size: Optional[int] = None) -> Tuple[int, bytes, int]:
    """Run one packet through an XDP program (BPF_PROG_TEST_RUN). Returns (XDP action,
    output packet, average ns per run). With `ifindex`, the packet arrives on that device
    of the current network namespace (ctx->ingress_ifindex)."""
    if len(packet) < 14:
        raise ValueError(f"packet of {len(packet)} bytes: the kernel needs at least 14")
    buf_in = ct.create_string_buffer(bytes(packet), len(packet))
    size_out = out_size or len(packet) + 256
    buf_out = ct.create_string_buffer(size_out)
    opts = TestRunOpts(sz=ct.sizeof(TestRunOpts), data_in=ct.cast(buf_in, ct.c_void_p),
                       data_out=ct.cast(buf_out, ct.c_void_p), data_size_in=len(packet),
                       data_size_out=size_out, repeat=repeat)
    ctx = None
    if ifindex:
        ctx = XdpMd(data=0, data_end=len(packet), ingress_ifindex=ifindex)
        opts.ctx_in = ct.cast(ct.pointer(ctx), ct.c_void_p)
        opts.ctx_size_in = ct.sizeof(ctx)
    _check(_lib.bpf_prog_test_run_opts(prog_fd, ct.byref(opts)), "BPF_PROG_TEST_RUN")
    return opts.retval, buf_out.raw[:opts.data_size_out], opts.duration


class RawMap:
    """A map by fd: keys and values are bytes. Per-CPU values are the kernel's layout
    (value size rounded to 8, times the possible CPUs); `per_cpu()` splits them."""

    def __init__(self, fd: int, name: str = "", owned: bool = False):
        self.fd = fd
        self.owned = owned
        info = map_info(fd)
        self.name = name or info.name.decode()
        self.type = info.type
        self.key_size = info.key_size
        self.value_size = info.value_size
        self.max_entries = info.max_entries
        self.id = info.id
        self.percpu = self.type in PERCPU_TYPES
        self.slot = (self.value_size + 7) & ~7
        self.vsize = self.slot * NR_CPUS if self.percpu else self.value_size

    @classmethod
    def pinned(cls, path: str) -> "RawMap":
        return cls(obj_get(path), os.path.basename(path), owned=True)

    def close(self):
        if self.owned and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def per_cpu(self, value: bytes) -> List[bytes]:
        return [value[i * self.slot:i * self.slot + self.value_size] for i in range(NR_CPUS)]

    # -- single elements ----------------------------------------------------------------
    def get(self, key: bytes) -> Optional[bytes]:
        v = ct.create_string_buffer(self.vsize)
        rc = _lib.bpf_map_lookup_elem(self.fd, key, v)
        if rc < 0:
            err = ct.get_errno() if rc == -1 else -rc
            if err == errno.ENOENT:
                return None
            raise BpfError(err, f"{self.name}: lookup: {os.strerror(err)}")
        return v.raw

    def put(self, key: bytes, value: bytes, flags: int = 0) -> None:
        self._sizes(key, value)
        _check(_lib.bpf_map_update_elem(self.fd, key, value, flags), f"{self.name}: update")

    def delete(self, key: bytes) -> bool:
        rc = _lib.bpf_map_delete_elem(self.fd, key)
        if rc < 0:
            err = ct.get_errno() if rc == -1 else -rc
            if err == errno.ENOENT:
                return False
            raise BpfError(err, f"{self.name}: delete: {os.strerror(err)}")
        return True

    def _sizes(self, key: bytes, value: Optional[bytes] = None):
        if len(key) != self.key_size or (value is not None and len(value) != self.vsize):
            raise ValueError(f"{self.name}: key/value of {len(key)}/"
                             f"{None if value is None else len(value)} bytes, map takes "
                             f"{self.key_size}/{self.vsize}")

    # -- batches ------------------------------------------------------------------------
    def update_many(self, items: Sequence[Tuple[bytes, bytes]], chunk: int = 8192,
                    previous: Optional[Mapping[bytes, bytes]] = None) -> None:
        """Write many entries (batched where the map type has batch operations), all or
        none: what each key held is recorded before writing, and if a write fails partway
        (a full map, a kernel refusal) every entry already written gets its old value back,
        or is deleted if it was new, before the error is raised. A caller that knows what
        the map holds passes it as `previous` (key -> value; keys not in it are new) and
        spares a lookup per entry."""
        # Read before anything is written; with `previous`, built only for an undo.
        old = None if previous is not None else [(k, self.get(k)) for k, _ in items]
        for i in range(0, len(items), chunk):
            try:
                self._write_chunk(items[i:i + chunk])
            except BpfError:
                # Up to the end of the failed chunk: where in it the kernel stopped does
                # not matter, putting back an entry that was not written changes nothing.
                if old is None:
                    old = [(k, previous.get(k)) for k, _ in items[:i + chunk]]
                self._undo(old[:i + chunk])
                raise

    def _write_chunk(self, part: Sequence[Tuple[bytes, bytes]]) -> None:
        keys, vals = zip(*part) if part else ((), ())
        # Every size checked at C speed (a 100,000-rule apply writes 100,000 entries).
        if set(map(len, keys)) - {self.key_size} or set(map(len, vals)) - {self.vsize}:
            for k, v in part:
                self._sizes(k, v)       # names the first wrong one
        if self.type in BATCH_TYPES:
            keys = b"".join(keys)
            vals = b"".join(vals)
            n = ct.c_uint32(len(part))
            rc = _lib.bpf_map_update_batch(self.fd, keys, vals, ct.byref(n), None)
            if rc >= 0:
                return
            err = ct.get_errno() if rc == -1 else -rc
            if err != errno.EINVAL:
                raise BpfError(err, f"{self.name}: batch update of {len(part)} entries "
                                    f"stopped after {n.value}: {os.strerror(err)}")
        for k, v in part:
            self.put(k, v)

    def _undo(self, old: Sequence[Tuple[bytes, Optional[bytes]]]) -> None:
        """Put back what `old` says each key held (None: it did not exist). Deletes first:
        they make the room the puts may need. (An array row "that did not exist" is zeros.)"""
        if self.type in ARRAY_TYPES:
            old = [(k, bytes(self.vsize) if v is None else v) for k, v in old]
        for k, v in old:
            if v is None:
                self.delete(k)
        for k, v in old:
            if v is not None:
                self.put(k, v)

    def delete_many(self, keys: Sequence[bytes], chunk: int = 8192) -> int:
        """Delete many keys (missing ones are fine). Returns how many were deleted."""
        done = 0
        for i in range(0, len(keys), chunk):
            part = list(keys[i:i + chunk])
            if self.type in BATCH_TYPES and self.type not in ARRAY_TYPES:
                n = ct.c_uint32(len(part))
                rc = _lib.bpf_map_delete_batch(self.fd, b"".join(part), ct.byref(n), None)
                if rc >= 0:
                    done += n.value
                    continue
                # ENOENT stops the batch at the first missing key: finish one by one.
                done += n.value
                part = part[n.value:]
            for k in part:
                done += self.delete(k)
        return done

    def items(self, chunk: int = 4096, skip_zero: bool = False) -> Iterator[Tuple[bytes, bytes]]:
        """Every entry, read in batches where the map type allows it. skip_zero leaves out
        entries whose value is all zeros (an array's unused rows, passed over a batch at
        a time: a 65,536-row array that is mostly empty costs milliseconds, not a second)."""
        if self.type in BATCH_TYPES:
            yield from self._items_batch(chunk, skip_zero)
        else:
            zero = bytes(self.vsize)
            yield from ((k, v) for k, v in self._items_iter() if not (skip_zero and v == zero))

    def keys(self) -> Iterator[bytes]:
        for k, _ in self.items():
            yield k

    def _items_batch(self, chunk: int, skip_zero: bool = False) -> Iterator[Tuple[bytes, bytes]]:
        ks, vs = self.key_size, self.vsize
        keys = ct.create_string_buffer(ks * chunk)
        vals = ct.create_string_buffer(vs * chunk)
        tok_in = ct.create_string_buffer(max(8, ks))
        tok_out = ct.create_string_buffer(max(8, ks))
        first = True
        while True:
            n = ct.c_uint32(chunk)
            rc = _lib.bpf_map_lookup_batch(self.fd, None if first else tok_in, tok_out, keys,
                                           vals, ct.byref(n), None)
            err = 0
            if rc < 0:
                err = ct.get_errno() if rc == -1 else -rc
                if err not in (errno.ENOENT,):
                    if err == errno.ENOSPC and chunk < 1 << 16:
                        # a hash bucket holds more than `chunk` entries: retry bigger
                        yield from (self.items(chunk * 4, skip_zero) if first else
                                    self._items_iter())
                        return
                    raise BpfError(err, f"{self.name}: batch lookup: {os.strerror(err)}")
            kr, vr = keys.raw, vals.raw
            if not (skip_zero and not vr[:n.value * vs].strip(b"\0")):
                zero = bytes(vs)
                for i in range(n.value):
                    v = vr[i * vs:(i + 1) * vs]
                    if not (skip_zero and v == zero):
                        yield kr[i * ks:(i + 1) * ks], v
            if err == errno.ENOENT:
                return
            ct.memmove(tok_in, tok_out, len(tok_out.raw))
            first = False

    def _items_iter(self) -> Iterator[Tuple[bytes, bytes]]:
        key = None
        nxt = ct.create_string_buffer(self.key_size)
        while True:
            rc = _lib.bpf_map_get_next_key(self.fd, key, nxt)
            if rc < 0:
                return
            key = nxt.raw
            v = self.get(key)
            if v is not None:
                yield key, v
            nxt = ct.create_string_buffer(self.key_size)

    def count(self) -> int:
        return sum(1 for _ in self.items())


# -- ring buffers ---------------------------------------------------------------------------
_RingCallback = ct.CFUNCTYPE(ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_size_t)
_lib.ring_buffer__new.argtypes = [ct.c_int, _RingCallback, ct.c_void_p, ct.c_void_p]
_lib.ring_buffer__new.restype = ct.c_void_p
_lib.ring_buffer__consume.argtypes = [ct.c_void_p]
_lib.ring_buffer__epoll_fd.argtypes = [ct.c_void_p]
_lib.ring_buffer__free.argtypes = [ct.c_void_p]


class RingBuffer:
    """A BPF ring buffer map read with libbpf: `fileno()` turns readable when records are
    waiting (for a selector), `consume()` hands each record's bytes to `on_record`. The map
    fd is duplicated, so whoever loaded the map may close theirs."""

    def __init__(self, map_fd: int, on_record):
        self.fd = os.dup(map_fd)
        self._on_record = on_record
        # Kept referenced: libbpf calls it for as long as the ring lives.
        self._cb = _RingCallback(self._record)
        self._rb = _lib.ring_buffer__new(self.fd, self._cb, None, None)
        if not self._rb:
            err = ct.get_errno()
            os.close(self.fd)
            raise BpfError(err, f"ring buffer: {os.strerror(err)}")
        self._epoll_fd = _lib.ring_buffer__epoll_fd(self._rb)

    def _record(self, _ctx, data, size) -> int:
        try:
            self._on_record(ct.string_at(data, size))
        except Exception:   # an exception cannot cross libbpf's C frames
            import logging
            logging.getLogger("xdpflow.bpfsys").exception("ring buffer record handler")
        return 0

    def fileno(self) -> int:
        return self._epoll_fd

    def consume(self) -> int:
        """Hand every waiting record to on_record; returns how many there were."""
        return _check(_lib.ring_buffer__consume(self._rb), "ring buffer consume")

    def close(self) -> None:
        if self._rb:
            _lib.ring_buffer__free(self._rb)
            self._rb = None
            os.close(self.fd)
