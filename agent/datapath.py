"""The datapath as the agent sees it: build the XDP program with BCC (sizes as -D flags),
keep its maps pinned and checked, write the compiled image into them with generation
flips, read counters and flows, and run packets through it (BPF_PROG_TEST_RUN)."""
from __future__ import annotations

import ctypes as ct
import hashlib
import heapq
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

from . import abi, bpfsys, compiler, digest
from .bpfsys import RawMap
from .config import Config
from .flows import flow_tenant

log = logging.getLogger("xdpflow.datapath")

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
PROGRAM = "xdpflow_port"
MAP_ORDER = list(abi.MAPS)
# Maps whose contents the agent can always rebuild from its store; the rest (flows,
# counters) are state the datapath made and are migrated when only their size changed.
REBUILT_FROM_STORE = {"xf_port_index", "xf_ports", "xf_tenants", "xf_masks", "xf_rules", "xf_endpoints",
                      "xf_routes", "xf_port_src", "xf_vnis", "xf_meta", "xf_policers", "xf_nat",
                      "xf_nat_prog"}
# The sizes' one home is the config's [datapath] defaults; bpf/xf_consts.h has none.
DEFAULT_DEFINES = Config().datapath_defines()


_SYS_MEMBARRIER = {"x86_64": 324, "aarch64": 283}.get(os.uname().machine)
MEMBARRIER_CMD_GLOBAL = 1
GRACE_FALLBACK_S = 0.05


def wait_for_readers() -> str:
    """Return once every XDP program run that began before the call has ended.

    A packet reads its tenant's generation and then looks up that generation's masks and
    classifier entries, all inside one RCU read-side section (XDP runs under the driver's
    NAPI poll; test runs under rcu_read_lock). membarrier(MEMBARRIER_CMD_GLOBAL) waits for
    an RCU grace period (synchronize_rcu()), so after it no packet can still be using a
    generation that was flipped away before the call. Where the kernel refuses it
    (nohz_full), a pause far longer than any program run stands in. Returns which."""
    if _SYS_MEMBARRIER is not None:
        libc = ct.CDLL(None, use_errno=True)
        if libc.syscall(_SYS_MEMBARRIER, MEMBARRIER_CMD_GLOBAL, 0, 0) == 0:
            return "rcu"
    time.sleep(GRACE_FALLBACK_S)
    return "pause"


def ensure_bpffs(path: str = "/sys/fs/bpf") -> bool:
    """Mount bpffs when it is missing (a fresh machine has none). Returns True if mounted."""
    with open("/proc/self/mounts") as f:
        if any(line.split()[1] == path and line.split()[2] == "bpf" for line in f):
            return False
    os.makedirs(path, exist_ok=True)
    libc = ct.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", path.encode(), b"bpf", 0, None) != 0:
        err = ct.get_errno()
        raise OSError(err, f"mount bpffs on {path}: {os.strerror(err)}")
    return True


def fs_type(path: str) -> str:
    """The filesystem type of the mount holding path (longest mount point prefix)."""
    path = os.path.realpath(path)
    best, kind = "", ""
    with open("/proc/self/mounts") as f:
        for line in f:
            _, mnt, typ = line.split()[:3]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, kind = mnt, typ
    return kind


_STAGED = "-staged"     # suffix of the staging dir of a build beside the live pins (bpffs allows no dots)
# The loaded programs, pinned beside their maps: a warm start adopts them (BCC's Python
# cannot load a compiled object, so not compiling means taking the loaded program).
PROG_PIN = "xf_prog"
PASS_PIN = "xf_pass"
# The program's own maps (not pinned: the monitor's), found again by id when adopted.
UNPINNED = ("xf_mon", "xf_mon_cpu", "xf_events")


def source_files() -> List[Path]:
    """What the datapath programs are compiled from (their build id hashes these)."""
    return sorted(BPF_DIR.glob("xf_*.h")) + [BPF_DIR / "xdpflow.c", BPF_DIR / "xf_pass.c"]


# Programs the port program tail-calls: prog array -> the functions at its indexes. Each
# compile of the port program loads them and writes them in (the trace build's array is
# its own, and the caller holds it: a prog array nobody in user space holds is emptied).
TAIL_CALLS = {"xf_nat_prog": ("xdpflow_nat_in", "xdpflow_nat_out")}


def compile_program(src: str, func: str, cflags: List[str] = (),
                    maps: Tuple[str, ...] = ()) -> Tuple[int, Dict[str, int]]:
    """Compile and load one XDP program with BCC. Returns its fd and those of the named
    maps, all the caller's: BCC's module (LLVM's state of the compile) is freed at once
    and the heap it used handed back to the system (about 100 MiB resident otherwise)."""
    # Imported only to compile: the unit tier never needs bcc, and an agent that adopts
    # never maps LLVM (tens of MiB resident).
    from bcc import BPF
    b = BPF(src_file=str(BPF_DIR / src).encode(), cflags=list(cflags))
    try:
        tails = TAIL_CALLS if func == PROGRAM else {}
        loaded = _verified(b, [func] + [t for names in tails.values() for t in names])
        fd = os.dup(loaded[func])
        for table, names in tails.items():
            for i, tail in enumerate(names):
                b[table.encode()][ct.c_int(i)] = ct.c_int(loaded[tail])
        own = {name: os.dup(b[name.encode()].get_fd()) for name in maps}
    finally:
        b.cleanup()
    trim_heap()
    return fd, own


def _verified(b, funcs: List[str]) -> Dict[str, int]:
    """Load `funcs` of the compiled module `b` (the kernel verifies each: seconds apiece
    for the port program and its tail-called NAT programs), all at once: each load is a
    bpf() syscall BCC makes with the GIL released, over the module's finished code, so
    they verify side by side on as many cores. Returns their fds (BCC's, closed by
    cleanup)."""
    from bcc import BPF
    if len(funcs) == 1:
        return {funcs[0]: b.load_func(funcs[0].encode(), BPF.XDP).fd}
    with ThreadPoolExecutor(len(funcs), thread_name_prefix="verify") as pool:
        fns = pool.map(lambda f: b.load_func(f.encode(), BPF.XDP), funcs)
        return {f: fn.fd for f, fn in zip(funcs, fns)}


def trim_heap() -> None:
    """Give the heap's free pages back to the system (glibc; elsewhere nothing)."""
    libc = ct.CDLL(None)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def pass_program(pin_dir: str, adopt: bool) -> int:
    """The pass-through program for veth peers (the caller's fd): the pinned one when
    `adopt` (a warm start: the same build id covers its source), else compiled and
    pinned."""
    path = f"{pin_dir}/{PASS_PIN}"
    if adopt and os.path.exists(path):
        fd = bpfsys.obj_get(path)
        if bpfsys.prog_info(fd).name == PASS_PIN.encode():
            return fd
        os.close(fd)
    fd, _ = compile_program("xf_pass.c", PASS_PIN)
    if os.path.exists(path):
        os.unlink(path)
    bpfsys.obj_pin(fd, path)
    return fd


@dataclass
class PinStatus:
    name: str
    action: str        # create | reuse | migrate | rebuild
    detail: str = ""


class Datapath:
    def __init__(self, pin_dir: str, defines: Optional[Dict[str, int]] = None):
        self.pin_dir = pin_dir.rstrip("/")
        self.defines = dict(DEFAULT_DEFINES)
        self.defines.update(defines or {})
        self.max_masks = self.defines["XF_MAX_MASKS"]
        self.prog_fd = -1
        self.trace_fd = -1
        self.how = ""              # compiled | adopted (the pinned program, no compile)
        self.build = 0             # the loaded program's build id
        self.load_seconds = 0.0
        self._own_maps: Dict[str, int] = {}     # UNPINNED name -> fd
        self._trace_rec = -1                    # the trace build's record map
        self._fds: List[int] = []               # every fd above, closed by close()
        self.maps: Dict[str, RawMap] = {}
        self.pin_report: List[PinStatus] = []
        # What the configuration maps hold (read once at load, then kept in step).
        self._mirror: Dict[str, Dict[bytes, bytes]] = {}
        self._gens: Dict[int, int] = {}                       # tenant id -> generation
        self._cls_gens: Dict[int, int] = {}                   # tenant id -> classifier's
        # The classifier each tenant's current cls generation holds, as the compiler keeps
        # it (one rule changes it in place); None until this process wrote it.
        self._cls: Dict[int, compiler.Classifier] = {}
        self._rules: Dict[Tuple[int, int], Dict[bytes, bytes]] = {}   # (tid, gen) -> entries
        self._masks: Dict[Tuple[int, int], bytes] = {}
        self._rule_slots: Dict[int, int] = {}                 # rule id -> counter slot
        self._pool: Optional[Tuple[List[int], List[int]]] = None   # see _slot_pool
        self._tenant_vals: Dict[int, bytes] = {}
        self._gen_floor: Dict[int, int] = {}   # generations to go on from (see load)
        self._digest_map: Optional[RawMap] = None   # the pinned digest (agent/digest.py)

    # -- build and load ----------------------------------------------------------------
    def cflags(self, trace: bool = False) -> List[str]:
        flags = [f"-I{BPF_DIR}", f'-DXF_PIN_DIR="{self.pin_dir}"', "-Wno-unused-function"]
        flags += [f"-D{k}={v}" for k, v in sorted(self.defines.items())]
        if trace:
            flags.append("-DXF_TRACE")
        # Extra -D flags for a different build of the same source (upgrade tests, debugging).
        flags += os.environ.get("XDPFLOW_CFLAGS", "").split()
        return flags

    def build_id(self) -> int:
        """What a loaded program was built from: the sources, the compile flags (sizes
        included) and the kernel. Equal ids: the pinned program is what a compile would
        make, so a starting agent adopts it. The pin dir is left out (a build made beside
        the live pins is the same build once they are moved in place)."""
        h = hashlib.sha256()
        h.update(f"{abi.ABI_VERSION}|{os.uname().release}|"
                 f"{os.path.realpath(f'/lib/modules/{os.uname().release}/build')}".encode())
        for f in source_files():
            h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
        for flag in self.cflags():
            if not flag.startswith("-DXF_PIN_DIR="):
                h.update(flag.encode() + b"\0")
        return int.from_bytes(h.digest()[:8], "little") or 1

    def check_pins(self) -> List[PinStatus]:
        """What loading would do with each pinned map: reuse it, create it, migrate its
        entries into a resized map, or rebuild it (layout changed)."""
        layout_ok = self._meta_layout() == self._combined_layout()
        out = []
        for name in MAP_ORDER:
            path = f"{self.pin_dir}/{name}"
            if not os.path.exists(path):
                out.append(PinStatus(name, "create"))
                continue
            m = RawMap.pinned(path)
            try:
                mtype, ks, vs, size = abi.map_spec(name, self.defines)
                if (m.type, m.key_size, m.value_size) != (mtype, ks, vs):
                    out.append(PinStatus(name, "rebuild",
                                         f"pinned type/key/value {m.type}/{m.key_size}/"
                                         f"{m.value_size}, program wants {mtype}/{ks}/{vs}"))
                elif not layout_ok and name != "xf_meta":
                    out.append(PinStatus(name, "rebuild", "layout fingerprint differs"))
                elif m.max_entries != size:
                    out.append(PinStatus(name, "migrate", f"size {m.max_entries} -> {size}"))
                else:
                    out.append(PinStatus(name, "reuse"))
            finally:
                m.close()
        return out

    def _combined_layout(self) -> int:
        h = hashlib.sha256()
        for name in MAP_ORDER:
            h.update(abi.layout_hash(name, self.defines).to_bytes(8, "little"))
        return int.from_bytes(h.digest()[:8], "little")

    def _meta_layout(self) -> Optional[int]:
        meta = self._meta()
        return meta.layout_hash if meta else None

    def _meta(self) -> Optional[abi.Meta]:
        """The pinned meta, if it is one of this ABI (else None: its pins are rebuilt)."""
        path = f"{self.pin_dir}/xf_meta"
        if not os.path.exists(path):
            return None
        m = RawMap.pinned(path)
        try:
            if m.value_size != ct.sizeof(abi.Meta):
                return None
            raw = m.get(bytes(ct.c_uint32(0)))
            meta = abi.Meta.from_buffer_copy(raw) if raw else None
            if not meta or meta.abi_version != abi.ABI_VERSION:
                return None
            return meta
        finally:
            m.close()

    def _write_meta(self, build_id: int) -> None:
        meta = abi.Meta(abi_version=abi.ABI_VERSION, layout_hash=self._combined_layout(),
                        build_id=build_id)
        self.maps["xf_meta"].put(bytes(ct.c_uint32(0)), bytes(meta))

    def _adopt(self, report: List[PinStatus], read_maps: bool = True) -> bool:
        """A warm start: every map reused and the pinned program built from what this
        agent would compile (the meta's build id). Takes the pinned program and its maps,
        compiling nothing. False (having changed nothing) when it cannot."""
        if any(st.action != "reuse" for st in report):
            return False
        meta = self._meta()
        path = f"{self.pin_dir}/{PROG_PIN}"
        if meta is None or meta.build_id != self.build_id() or not os.path.exists(path):
            return False
        t0 = time.monotonic()
        fd, maps, own = -1, {}, {}
        try:
            fd = bpfsys.obj_get(path)
            maps = {name: RawMap.pinned(f"{self.pin_dir}/{name}") for name in MAP_ORDER}
            if bpfsys.prog_info(fd).name != PROGRAM.encode():
                raise ValueError(f"{path} is not an {PROGRAM} program")
            for map_id in bpfsys.prog_map_ids(fd):
                mfd = bpfsys.map_fd_by_id(map_id)
                name = bpfsys.map_info(mfd).name.decode()
                if name in UNPINNED and name not in own:
                    own[name] = mfd
                    continue
                os.close(mfd)
                if name in maps and maps[name].id != map_id:
                    raise ValueError(f"its {name} is not the pinned one")
            if set(own) != set(UNPINNED):
                raise ValueError(f"its maps {sorted(set(UNPINNED) - set(own))} not found")
        except (OSError, ValueError) as e:
            log.warning("pinned program %s not adopted (compiling instead): %s", path, e)
            for f in [fd, *own.values()]:
                if f >= 0:
                    os.close(f)
            for m in maps.values():
                m.close()
            return False
        self.prog_fd, self.maps, self._own_maps = fd, maps, own
        self._fds = [fd, *own.values()]
        if read_maps:
            self._read_mirror()
        self.how, self.load_seconds = "adopted", time.monotonic() - t0
        self.build = meta.build_id
        log.info("datapath adopted: pinned program id %d (build %016x) and its maps, "
                 "nothing compiled, in %.3fs", bpfsys.prog_info_id(fd), meta.build_id,
                 self.load_seconds)
        return True

    def _pin_program(self, build_id: Optional[int]) -> None:
        """Pin the compiled program beside its maps. The meta names no build while the pin
        changes (a crash in between leaves nothing adoptable), then this one's, unless
        build_id is None (a build beside the live pins: its commit names it)."""
        self._write_meta(0)
        path = f"{self.pin_dir}/{PROG_PIN}"
        if os.path.exists(path):
            os.unlink(path)
        bpfsys.obj_pin(self.prog_fd, path)
        if build_id is not None:
            self._write_meta(build_id)

    def load(self, beside: bool = False, adopt: bool = True,
             read_maps: bool = True, compile: bool = True) -> List[PinStatus]:
        """Compile and load the program, reusing, migrating or rebuilding pinned maps; or,
        with `adopt` when every map is reused and the pinned program has this build id,
        take the pinned program as it is (a warm start, see _adopt: `how` says which).
        An adopted datapath with `read_maps=False` has not read its configuration maps
        yet (100,000 rules: a fraction of a second): read_mirror() before any use.
        `compile=False`: adopt or nothing (`how` stays "", nothing changed): the caller
        compiles elsewhere (the daemon's start: in a child process).

        beside=True is for a reload that resizes maps while a program runs on the ports:
        the build goes to a staging dir next to the live pins and touches neither them nor
        the running program's maps. Maps kept as they are are shared (pinned in the staging
        dir too); if any configuration map changes, every configuration map is a fresh one,
        so the running program never meets a generation written for the new one. After the
        program swap, `commit_pins()` moves the pins in place; `close()` and
        `discard_staged()` before that leave everything as it was."""
        ensure_bpffs()
        os.makedirs(self.pin_dir, exist_ok=True)
        if fs_type(self.pin_dir) != "bpf":
            raise OSError(f"{self.pin_dir} is not on a bpf filesystem (agent.bpffs must be "
                          f"under a bpffs mount such as /sys/fs/bpf)")
        # A staging dir left by a reload that died before its commit: the live pins win.
        shutil.rmtree(self.staging_dir, ignore_errors=True)
        report = self.check_pins()
        if adopt and not beside and self._adopt(report, read_maps):
            self.pin_report = report
            self._open_digest()
            return report
        if not compile:
            return report
        live = self.pin_dir
        if beside:
            os.makedirs(self.staging_dir)
            fresh_config = any(st.action != "reuse" for st in report
                               if st.name in REBUILT_FROM_STORE and st.action != "create")
            if fresh_config:
                # The flow table may be shared: generations go on from the running ones,
                # or a flow judged by the old rules would be a hit under the new.
                self._gen_floor = self._live_generations(f"{live}/xf_tenants")
            self.pin_dir = self.staging_dir
        saved: Dict[str, List[Tuple[bytes, bytes]]] = {}
        for st in report:
            path = f"{live}/{st.name}"
            if st.action == "migrate" and st.name not in REBUILT_FROM_STORE:
                old = RawMap.pinned(path)
                saved[st.name] = list(old.items())
                old.close()
            if beside and st.action == "reuse":
                if fresh_config and st.name in REBUILT_FROM_STORE:
                    st.action = "rebuild"
                    st.detail = "a fresh one, with every configuration map (one was resized)"
                else:
                    self._share(path, f"{self.pin_dir}/{st.name}")
            elif not beside and st.action in ("migrate", "rebuild"):
                os.unlink(path)       # the old program keeps its map until it is replaced
            if st.action == "rebuild" and st.name not in REBUILT_FROM_STORE:
                st.detail += "; its entries are dropped (flows re-classify, counters restart)"
        t0 = time.monotonic()
        self.prog_fd, self._own_maps = compile_program("xdpflow.c", PROGRAM, self.cflags(),
                                                       UNPINNED)
        self._fds = [self.prog_fd, *self._own_maps.values()]
        self.how, self.load_seconds = "compiled", time.monotonic() - t0
        self.build = self.build_id()
        log.info("datapath compiled and loaded in %.2fs", self.load_seconds)
        self.maps = {name: RawMap.pinned(f"{self.pin_dir}/{name}") for name in MAP_ORDER}
        for name, items in saved.items():
            m = self.maps[name]
            keep = items[:m.max_entries]
            m.update_many(keep, previous={})          # a fresh map
            for st in report:
                if st.name == name:
                    st.detail += f"; {len(keep)} entries copied" + (
                        f", {len(items) - len(keep)} did not fit" if len(items) > len(keep) else "")
        self._pin_program(None if beside else self.build)
        self._read_mirror()
        self.pin_report = report
        self._open_digest()
        self.forget_digest()        # a new program: what the maps hold is to be checked
        return report

    @staticmethod
    def _live_generations(path: str) -> Dict[int, int]:
        if not os.path.exists(path):
            return {}
        m = RawMap.pinned(path)
        try:
            out = {}
            for k, v in m.items():
                t = abi.Tenant.from_buffer_copy(v)
                gen = max(t.generation, t.cls_generation)
                if t.generation:
                    out[ct.c_uint32.from_buffer_copy(k).value] = gen
            return out
        finally:
            m.close()

    @property
    def staging_dir(self) -> str:
        base = self.pin_dir[:-len(_STAGED)] if self.pin_dir.endswith(_STAGED) else self.pin_dir
        return base + _STAGED

    @staticmethod
    def _share(src: str, dst: str) -> None:
        fd = bpfsys.obj_get(src)
        try:
            bpfsys.obj_pin(fd, dst)
        finally:
            os.close(fd)

    def commit_pins(self) -> None:
        """A build made beside the live pins becomes the pinned datapath (after its
        program was swapped onto the ports): each pin renamed over the live one."""
        if not self.pin_dir.endswith(_STAGED):
            return
        live = self.pin_dir[:-len(_STAGED)]
        for name in MAP_ORDER + [PROG_PIN, digest.PIN]:
            os.rename(f"{self.pin_dir}/{name}", f"{live}/{name}")
        os.rmdir(self.pin_dir)
        self.pin_dir = live
        self._write_meta(self.build)

    def discard_staged(self) -> None:
        """Forget a build made beside the live pins (close() it too)."""
        if self.pin_dir.endswith(_STAGED):
            shutil.rmtree(self.pin_dir, ignore_errors=True)
            self.pin_dir = self.pin_dir[:-len(_STAGED)]

    def load_trace(self) -> int:
        """The trace build shares the pinned maps; it records instead of counting."""
        if self.trace_fd < 0:
            self.trace_fd, own = compile_program("xdpflow.c", PROGRAM, self.cflags(trace=True),
                                                 ("xf_trace_rec", "xf_nat_prog"))
            self._trace_rec = own["xf_trace_rec"]
            self._fds += [self.trace_fd, self._trace_rec, own["xf_nat_prog"]]
        return self.trace_fd

    def close(self):
        for m in self.maps.values():
            m.close()
        self.maps = {}
        if self._digest_map is not None:
            self._digest_map.close()
            self._digest_map = None
        for fd in self._fds:
            os.close(fd)
        self._fds, self._own_maps = [], {}
        self.prog_fd = self.trace_fd = self._trace_rec = -1

    def unpin(self):
        """Remove every pin (explicit teardown), and a reload's staging dir."""
        for d in (self.pin_dir, self.staging_dir):
            if os.path.isdir(d):
                shutil.rmtree(d, ignore_errors=True)

    # -- the digest of the programmed image (agent/digest.py) ----------------------------
    def _open_digest(self) -> None:
        """The pinned digest map of this pin dir, made (empty) when missing or not one."""
        path = f"{self.pin_dir}/{digest.PIN}"
        size = ct.sizeof(digest.Record)
        if os.path.exists(path):
            m = RawMap.pinned(path)
            if (m.type, m.key_size, m.value_size) == (bpfsys.BPF_MAP_TYPE_ARRAY, 4, size):
                self._digest_map = m
                return
            m.close()
            os.unlink(path)
        fd = bpfsys.map_create(bpfsys.BPF_MAP_TYPE_ARRAY, digest.PIN, 4, size, 1)
        bpfsys.obj_pin(fd, path)
        self._digest_map = RawMap(fd, digest.PIN, owned=True)

    def pinned_digest(self) -> Optional[bytes]:
        """The digest of the image the maps were last programmed with; None: none (cleared
        while a change was written, never written, or not a digest)."""
        if self._digest_map is None:
            return None
        return digest.unpack(self._digest_map.get(bytes(4)))

    def record_digest(self, value: Optional[bytes]) -> None:
        """Pin `value` as the programmed image's digest; None clears it (before a change
        writes its first entry)."""
        if self._digest_map is not None:
            m = self._digest_map
            m.put(bytes(4), digest.pack(value) if value else bytes(m.value_size))

    def forget_digest(self) -> None:
        self.record_digest(None)

    def maps_summary(self) -> bytes:
        """The configuration maps as this process holds them (read at load, then kept in
        step): tenant entries, mask sets and entry counts, for the digest."""
        counts = {name: len(m) for name, m in self._mirror.items()}
        counts["xf_rules"] = sum(len(e) for e in self._rules.values())
        counts["xf_policers"] = len(self._policers)
        return digest.maps_summary(self._tenant_vals, self._masks, counts)

    def hold(self, tid: int, cls: compiler.Classifier) -> bool:
        """Take `cls` as the classifier the tenant's maps hold, if they hold it (compared
        entry for entry): one-rule changes need it after a start that skipped the
        compare."""
        return tid in self._cls_gens and self._holds(tid, cls)

    # -- configuration maps -------------------------------------------------------------
    def read_mirror(self) -> None:
        """Read what the configuration maps hold, if not read yet (load() does, unless
        told not to)."""
        if not self._mirror:
            self._read_mirror()

    def _read_mirror(self):
        self._mirror = {n: dict(self.maps[n].items())
                        for n in ("xf_ports", "xf_port_src", "xf_endpoints", "xf_routes",
                                  "xf_vnis", "xf_nat")}
        # Arrays (16,384 port rows, 65,536 tenant rows): their empty rows are passed over.
        self._mirror["xf_port_index"] = {k: v for k, v in
                                         self.maps["xf_port_index"].items(skip_zero=True)
                                         if abi.Port.from_buffer_copy(v).slot}
        self._policers = dict(self.maps["xf_policers"].items())
        self._gens, self._cls_gens, self._tenant_vals, self._cls = {}, {}, {}, {}
        for k, v in self.maps["xf_tenants"].items(skip_zero=True):
            t = abi.Tenant.from_buffer_copy(v)
            if t.generation:
                tid = ct.c_uint32.from_buffer_copy(k).value
                self._gens[tid] = t.generation
                self._cls_gens[tid] = t.cls_generation or t.generation
                t.flows = 0         # the datapath's field: never compared or cached
                self._tenant_vals[tid] = bytes(t)
        self._rules, self._rule_slots, self._pool = {}, {}, None
        for k, v in self.maps["xf_rules"].items():
            rk = abi.RuleKey.from_buffer_copy(k)
            self._rules.setdefault((rk.tenant, rk.generation), {})[k] = v
            r = abi.Rule.from_buffer_copy(v)
            self._rule_slots[r.rule_id] = r.stat
        self._masks = {}
        for k, v in self.maps["xf_masks"].items():
            mk = abi.MaskKey.from_buffer_copy(k)
            self._masks[(mk.tenant, mk.generation)] = v

    def generation(self, tenant_id: int) -> int:
        return self._gens.get(tenant_id, 0)

    def classifier(self, tenant_id: int) -> Optional[compiler.Classifier]:
        """The classifier the tenant's maps hold, if this process wrote it (else None)."""
        return self._cls.get(tenant_id)

    def map_pressure(self, flows: int) -> Dict[str, Tuple[int, int]]:
        """(entries in use, capacity) of every map whose size the configuration sets.
        The configuration maps are counted from the mirror (the agent is their only
        writer, so it is what the kernel holds; a test compares the two), the flow table
        is `flows`, the last sweep's count: reading a million entries per scrape would
        cost seconds. Ports count both port maps (array index and hash): max_ports bounds
        their slots together."""
        used = {"xf_flows": flows,
                "xf_rules": sum(len(e) for e in self._rules.values()),
                "xf_masks": len(self._masks),
                "xf_endpoints": len(self._mirror.get("xf_endpoints", {})),
                "xf_routes": len(self._mirror.get("xf_routes", {})),
                "xf_ports": len(self._mirror.get("xf_ports", {})) +
                len(self._mirror.get("xf_port_index", {}))}
        return {name: (n, abi.map_spec(name, self.defines)[3]) for name, n in used.items()}

    def sync(self, img: compiler.Image, flush_removed: bool = True) -> Dict[str, object]:
        """Make the configuration maps hold `img`. New tenants first (classifier and
        tenant entry), so no port or endpoint ever names a tenant the datapath does not
        know; then forwarding entries; then each tenant whose classifier changed gets it
        under a new generation (written whole, then flipped to), and each tenant whose
        forwarding changed a new generation of its flows; the old classifier generation
        removed; removed tenants last, after every entry naming them. Returns what
        changed."""
        changed_tenants: Set[int] = set()
        summary: Dict[str, object] = {}
        gone_policers = self._sync_policers(img, summary)
        self._assign_rule_slots(img)
        flipped, bumped = [], []
        created = {tid for tid in img.tenants if tid not in self._gens}
        for tid in sorted(created):
            self._flip(tid, img.tenants[tid])
            flipped.append(img.tenants[tid].name)
        indexed = {k: v for k, v in img.ports.items()
                   if ct.c_uint32.from_buffer_copy(k).value < abi.PORT_INDEX}
        hashed = {k: v for k, v in img.ports.items() if k not in indexed}
        # Port security's sources go first: a port that turns security on finds them.
        slot_tenant = {abi.Port.from_buffer_copy(v).slot: abi.Port.from_buffer_copy(v).tenant
                       for m in (self._mirror["xf_port_index"], self._mirror["xf_ports"],
                                 img.ports) for v in m.values()}
        for name, want in (("xf_port_src", img.port_src), ("xf_port_index", indexed),
                           ("xf_ports", hashed), ("xf_endpoints", img.endpoints),
                           ("xf_routes", img.routes), ("xf_vnis", img.vnis),
                           ("xf_nat", img.nat)):
            have = self._mirror[name]
            put = [(k, v) for k, v in want.items() if have.get(k) != v]
            gone = [k for k in have if k not in want]
            for k, v in put:
                changed_tenants.add(self._tenant_of(name, k, v, slot_tenant))
            for k in gone:
                changed_tenants.add(self._tenant_of(name, k, have[k], slot_tenant))
            m = self.maps[name]
            # The mirror follows each write that succeeded (a failed one is rolled back
            # whole by the map layer), so a restore after a failure diffs against the truth.
            if put:
                m.update_many(put, previous=have)
                have.update(put)
            if gone and name == "xf_port_index":
                m.update_many([(k, bytes(abi.Port())) for k in gone],   # an array row is cleared
                              previous=have)
            elif gone:
                m.delete_many(gone)
            for k in gone:
                del have[k]
            summary[name] = {"written": len(put), "removed": len(gone)}

        for tid, t in sorted(img.tenants.items()):
            if tid in created:
                continue
            if not self._holds(tid, t.classifier):
                self._flip(tid, t)
                flipped.append(t.name)
                continue
            self._write_tenant(tid, default_verdict=t.default_verdict, vni=t.vni,
                               policer=t.policer, max_flows=t.max_flows)
            if tid in changed_tenants:
                self._bump(tid)
                bumped.append(t.name)
        removed = [tid for tid in self._gens if tid not in img.tenants]
        for tid in removed:
            self.maps["xf_tenants"].put(bytes(ct.c_uint32(tid)), bytes(abi.Tenant()))
            self._tenant_vals.pop(tid, None)
            self._cls.pop(tid, None)
            del self._gens[tid], self._cls_gens[tid]
        # The old generations go only once no packet can still be classifying against
        # them (a packet that read the generation number before the flip): removed under
        # it, a packet would see half a rule set.
        old = [k for k in list(self._rules) + list(self._masks)
               if self._cls_gens.get(k[0]) != k[1]]
        if old:
            summary["grace"] = self.wait_for_readers()
        for tid in img.tenants:
            self._drop_other_generations(tid, self._cls_gens[tid])
        for tid in removed:
            self._drop_other_generations(tid, None)
            if flush_removed:
                self.flush_flows(tid)
        # Leftovers of a crash between writing a generation and flipping to it.
        for tid, _ in list(self._rules) + list(self._masks):
            if tid not in self._gens:
                self._drop_other_generations(tid, None)
        # Rate limits go once nothing names them (a missing bucket is no limit).
        if gone_policers:
            self.maps["xf_policers"].delete_many(gone_policers)
            for k in gone_policers:
                del self._policers[k]
        summary["xf_policers"]["removed"] = len(gone_policers)
        summary["flipped"] = flipped
        summary["bumped"] = bumped
        summary["removed_tenants"] = removed
        return summary

    def _sync_policers(self, img: compiler.Image, summary: Dict[str, object]) -> List[bytes]:
        """Write the rate limits that are new or changed (before any tenant or rule names
        them; a changed one starts full), and return the keys to remove at the end.
        Unchanged buckets are left alone: their state is the datapath's."""
        have = self._policers
        put = [(k, v) for k, v in img.policers.items()
               if k not in have or compiler.policer_config(have[k]) != compiler.policer_config(v)]
        if put:
            self.maps["xf_policers"].update_many(put, previous=have)
            have.update(put)
        summary["xf_policers"] = {"written": len(put)}
        return [k for k in have if k not in img.policers]

    def policers(self) -> Dict[int, abi.Policer]:
        """xf_policers key -> its bucket as the datapath holds it now."""
        return {ct.c_uint32.from_buffer_copy(k).value: abi.Policer.from_buffer_copy(v)
                for k, v in self.maps["xf_policers"].items()}

    def _holds(self, tid: int, cls: compiler.Classifier) -> bool:
        """Whether the tenant's current classifier generation holds `cls` (the same
        object this process wrote, or the same bytes). A classifier compiled from scratch
        numbers its masks in search order; one changed rule by rule keeps each mask's
        number: `cls` takes the pinned set's numbers when both have the same masks, so an
        agent that restarts after one-rule changes finds its maps as they should be."""
        if self._cls.get(tid) is cls:
            return True
        gen = self._cls_gens[tid]
        pinned = self._masks.get((tid, gen))
        if pinned is not None:
            ms = abi.mask_set_type(self.max_masks).from_buffer_copy(pinned)
            idx = {(bytes(m.src), bytes(m.dst), m.sport, m.dport, m.proto, m.in_port): m.key_idx
                   for m in ms.masks[:min(ms.count, self.max_masks)]}
            if set(idx) == set(cls.key_idx) and len(set(idx.values())) == len(idx):
                cls.key_idx = idx
        if self._masks.get((tid, gen)) != bytes(cls.mask_set(self.max_masks)):
            return False
        if self._rules.get((tid, gen), {}) != dict(cls.rule_items(tid, gen, self._rule_slots)):
            return False
        self._cls[tid] = cls
        return True

    def change_rules(self, tid: int, removed: List, added: List, slots: Dict[str, int],
                     tenant: str = "") -> Dict[str, object]:
        """One tenant's rules changed in place, under its current classifier generation,
        touching only the entries of those rules: for a change of one rule (added,
        removed, or replaced) every packet sees the old rule or the new one, never a mix
        (a packet matches at most one entry of a rule, and the entries are written before
        the old ones go). Order, each step safe on its own for a packet in flight: new
        and changed entries; the mask set, replaced in one update; entries no longer
        wanted; then the tenant's flow generation, so flows judged under the old rules
        are misses from then on. Raises LookupError when this process does not hold the
        tenant's classifier (the caller syncs the whole image instead); after any other
        error the caller syncs the old image back, which sees what was written."""
        cls = self._cls.get(tid)
        if cls is None:
            raise LookupError(f"tenant {tid}: classifier not held")
        gen = self._cls_gens[tid]
        old_idx = dict(cls.key_idx)
        mirror = self._rules.setdefault((tid, gen), {})
        del self._cls[tid]              # until the change is written whole
        touched = []
        cls.reserved = set(old_idx.values())    # no mask takes the number of one leaving
        try:
            for r in removed:
                touched += cls.remove_rule(r, slots)
            for r in added:
                touched += cls.add_rule(r, slots)
        finally:
            cls.reserved = set()
        compiler.check_masks(tenant or f"id {tid}", cls, self.max_masks)
        self._change_rule_slots({r.id for r in removed}, {r.id for r in added})
        put: Dict[bytes, bytes] = {}
        gone: List[bytes] = []
        for mask, key in dict.fromkeys(touched):
            kb, vb = cls.entry_item(mask, key, tid, gen, self._rule_slots)
            if vb is not None and mask in cls.key_idx and mirror.get(kb) != vb:
                put[kb] = vb
            if mask in old_idx:
                ob = cls.key_bytes(old_idx[mask], key, tid, gen)
                if ob in mirror and (vb is None or ob != kb):
                    gone.append(ob)
        mask_val = bytes(cls.mask_set(self.max_masks))
        if put:
            self.maps["xf_rules"].update_many(list(put.items()), previous=mirror)
            mirror.update(put)
        if mask_val != self._masks.get((tid, gen)):
            self.maps["xf_masks"].put(bytes(abi.MaskKey(tenant=tid, generation=gen)), mask_val)
            self._masks[(tid, gen)] = mask_val
        if gone:
            self.maps["xf_rules"].delete_many(gone)
            for k in gone:
                del mirror[k]
        self._bump(tid)
        self._cls[tid] = cls
        return {"xf_rules": {"written": len(put), "removed": len(gone)},
                "masks": len(cls.by_mask), "bumped": [tid]}

    def _assign_rule_slots(self, img: compiler.Image) -> None:
        """Counter slots for the image's rules. A rule id new to the datapath (also one
        used before by a deleted rule) starts from zero: its slot's rows and its hits."""
        live = set()
        for t in img.tenants.values():
            live |= t.classifier.rule_ids()
        new_ids = live - set(self._rule_slots)
        self._rule_slots, fresh = compiler.assign_stat_slots(live, self._rule_slots)
        self._pool = None
        self._zero_rule_counters(fresh, new_ids)

    def _change_rule_slots(self, removed: Set[int], added: Set[int]) -> None:
        """Counter slots after removing and adding rule ids (one id in both: replaced,
        it keeps its slot and counts on)."""
        free, top = self._slot_pool()
        for rid in removed - added:
            slot = self._rule_slots.pop(rid, 0)
            if slot:
                heapq.heappush(free, slot)
        new_ids = {rid for rid in added if rid not in self._rule_slots}
        fresh = []
        for rid in sorted(new_ids):
            # The smallest free slot, as assign_stat_slots gives them; none left: 0.
            slot = heapq.heappop(free) if free else top[0]
            if slot == top[0]:
                top[0] += 1
            self._rule_slots[rid] = slot if slot < abi.RULE_STATS else 0
            if slot < abi.RULE_STATS:
                fresh.append(slot)
        if new_ids:
            self._zero_rule_counters(fresh, new_ids)

    def _slot_pool(self) -> Tuple[List[int], List[int]]:
        """(free counter slots below the highest in use, as a heap; [the next one above]),
        built once from the slots in use and kept by one-rule changes (a whole sync's
        assignment starts it again)."""
        if self._pool is None:
            used = set(self._rule_slots.values())
            top = max(used, default=0) + 1
            self._pool = ([s for s in range(1, top) if s not in used], [top])
        return self._pool

    def _zero_rule_counters(self, fresh_slots: List[int], new_ids: Set[int]) -> None:
        if fresh_slots:
            m = self.maps["xf_rule_stats"]
            zero = bytes(m.vsize)
            # previous={}: a failed write puts zeros back, which is what is being written.
            m.update_many([(bytes(ct.c_uint32(s)), zero) for s in fresh_slots], previous={})
        if new_ids:
            # Only ids with hits have an entry: a delete of each new id would be a syscall
            # per rule of a 100,000-rule apply.
            hits = self.maps["xf_rule_hits"]
            gone = [k for k in hits.keys() if ct.c_uint32.from_buffer_copy(k).value in new_ids]
            hits.delete_many(gone)

    # One place the grace period is waited for (tests observe the order of map writes).
    wait_for_readers = staticmethod(wait_for_readers)

    def _tenant_of(self, name: str, key: bytes, value: bytes, slot_tenant: Dict[int, int]) -> int:
        if name == "xf_port_src":
            return slot_tenant.get(abi.SrcKey.from_buffer_copy(key).slot, 0)
        if name in ("xf_ports", "xf_port_index"):
            return abi.Port.from_buffer_copy(value).tenant
        if name == "xf_endpoints":
            return abi.EpKey.from_buffer_copy(key).tenant
        if name == "xf_vnis":
            return ct.c_uint32.from_buffer_copy(value).value
        if name == "xf_nat":       # a floating address's key has no tenant; its value does
            return abi.NatKey.from_buffer_copy(key).tenant or abi.Nat.from_buffer_copy(value).tenant
        return abi.RouteKey.from_buffer_copy(key).tenant

    def _write_tenant(self, tid: int, **fields) -> None:
        """Change fields of a tenant's entry, one field per map update. The tenant array's
        update is a copy a packet may read half of: with one field changing per update,
        any half is the old or the new entry. Callers order the fields so each step is
        safe (a new classifier generation before the flow generation that trusts it).
        The flow count is the datapath's field: each write keeps the count it reads just
        before (an insert made between that read and the write is lost to the count until
        the sweeper re-bases it); the cached entry holds 0 there."""
        key = bytes(ct.c_uint32(tid))
        cur = abi.Tenant.from_buffer_copy(self._tenant_vals.get(tid, bytes(abi.Tenant())))
        for name, value in fields.items():
            if getattr(cur, name) == value:
                continue
            setattr(cur, name, value)
            out = abi.Tenant.from_buffer_copy(bytes(cur))
            live = self.maps["xf_tenants"].get(key)
            if live is not None:
                out.flows = abi.Tenant.from_buffer_copy(live).flows
            self.maps["xf_tenants"].put(key, bytes(out))
            self._tenant_vals[tid] = bytes(cur)

    def _next_generation(self, tid: int) -> int:
        used = {g for (x, g) in list(self._rules) + list(self._masks) if x == tid}
        gen = self._gens.get(tid) or self._gen_floor.get(tid, 0)
        while True:
            gen = gen + 1 if gen < 0xFFFFFFFF else 1
            if gen not in used:
                return gen

    def _bump(self, tid: int) -> None:
        """A new flow generation: the tenant's flows are misses from now on."""
        gen = self._next_generation(tid)
        self._write_tenant(tid, generation=gen)
        self._gens[tid] = gen

    def _flip(self, tid: int, t: compiler.TenantImage) -> int:
        """The tenant's classifier written whole under a new generation, then the tenant
        entry pointed at it: first its classifier generation (flows judged meanwhile are
        of the old flow generation), then its flow generation. A new tenant's entry is
        written at once (nothing reads half of an entry that was not there)."""
        gen = self._next_generation(tid)
        items = list(t.classifier.rule_items(tid, gen, self._rule_slots))
        self.maps["xf_rules"].update_many(items, previous={})    # a generation not in use
        self._rules[(tid, gen)] = dict(items)
        mk = bytes(abi.MaskKey(tenant=tid, generation=gen))
        mask_val = bytes(t.classifier.mask_set(self.max_masks))
        self.maps["xf_masks"].put(mk, mask_val)
        self._masks[(tid, gen)] = mask_val
        if tid not in self._gens:
            tval = bytes(abi.Tenant(generation=gen, default_verdict=t.default_verdict,
                                    vni=t.vni, cls_generation=gen,
                                    policer=t.policer, max_flows=t.max_flows))
            self.maps["xf_tenants"].put(bytes(ct.c_uint32(tid)), tval)
            self._tenant_vals[tid] = tval
        else:
            self._write_tenant(tid, default_verdict=t.default_verdict, vni=t.vni,
                               policer=t.policer, max_flows=t.max_flows,
                               cls_generation=gen, generation=gen)
        self._gens[tid] = self._cls_gens[tid] = gen
        self._cls[tid] = t.classifier
        return gen

    def tenant_flow_counts(self) -> Dict[int, int]:
        """Each configured tenant's flow count as the datapath keeps it (for its quota)."""
        out = {}
        for tid in self._gens:
            v = self.maps["xf_tenants"].get(bytes(ct.c_uint32(tid)))
            if v is not None:
                out[tid] = abi.Tenant.from_buffer_copy(v).flows
        return out

    def rebase_flow_counts(self, counted: Dict[int, int], before: Dict[int, int]) -> None:
        """After a sweep: each tenant's flow count is what the sweep found it holding
        (`counted`, after evictions), plus what the datapath added since the sweep began
        (its count now minus `before`). Entries made during the sweep and also seen by it
        count twice until the next sweep: the quota errs strict, never lenient for long."""
        for tid, was in before.items():
            key = bytes(ct.c_uint32(tid))
            cur = self.maps["xf_tenants"].get(key)
            if cur is None:
                continue
            t = abi.Tenant.from_buffer_copy(cur)
            if not t.generation:
                continue
            t.flows = counted.get(tid, 0) + max(0, t.flows - was)
            self.maps["xf_tenants"].put(key, bytes(t))

    def _drop_other_generations(self, tid: int, keep: Optional[int]):
        for key in [k for k in self._rules if k[0] == tid and k[1] != keep]:
            self.maps["xf_rules"].delete_many(list(self._rules.pop(key)))
        for key in [k for k in self._masks if k[0] == tid and k[1] != keep]:
            self.maps["xf_masks"].delete(bytes(abi.MaskKey(tenant=key[0], generation=key[1])))
            del self._masks[key]

    # -- flows ----------------------------------------------------------------------------
    def flows(self) -> Iterator[Tuple[abi.FlowKey, abi.Flow]]:
        for k, v in self.maps["xf_flows"].items():
            yield abi.FlowKey.from_buffer_copy(k), abi.Flow.from_buffer_copy(v)

    def flush_flows(self, tenant_id: Optional[int] = None) -> int:
        before = self.tenant_flow_counts()
        if tenant_id is not None:
            before = {t: n for t, n in before.items() if t == tenant_id}
        keys = [k for k, v in self.maps["xf_flows"].items()
                if tenant_id is None or flow_tenant(k, v) == tenant_id]
        n = self.delete_flows(keys)
        self.rebase_flow_counts({}, before)     # the flushed tenants hold nothing now
        return n

    def flow_items(self) -> Iterator[Tuple[bytes, bytes]]:
        """The raw flow table (key bytes, entry bytes), read in batches: the sweeper reads a
        million of these per sweep, a slice at a time, and unpacks only what it needs
        (flow_head, flow_age)."""
        return self.maps["xf_flows"].items()

    def flow_entry(self, key: bytes) -> Optional[bytes]:
        return self.maps["xf_flows"].get(key)

    def delete_flows(self, keys: List[bytes]) -> int:
        return self.maps["xf_flows"].delete_many(keys)

    # -- counters ---------------------------------------------------------------------------
    def counters(self, max_slot: Optional[int] = None) -> List[Tuple[int, int, int, int, int]]:
        """Non-zero rows as (port slot, verdict, reason, packets, bytes), summed over CPUs.
        Only the rows of slots up to max_slot are read (the array holds every possible
        port; a scrape should not walk them all on a many-CPU node)."""
        m = self.maps["xf_stats"]
        limit = m.max_entries if max_slot is None else \
            min(m.max_entries, abi.stats_index(max_slot + 1, 0, 0))
        zero = bytes(m.vsize)
        out = []
        for k, v in m.items():
            idx = ct.c_uint32.from_buffer_copy(k).value
            if idx >= limit:
                break
            if v == zero:
                continue
            words = memoryview(v).cast("Q")        # per CPU: packets, bytes
            slot, verdict, reason = abi.stats_row(idx)
            out.append((slot, verdict, reason, sum(words[0::2]), sum(words[1::2])))
        return out

    def clear_counters(self, slot: int) -> None:
        """Zero a port slot's rows (a slot handed to a new port starts from zero)."""
        m = self.maps["xf_stats"]
        zero = bytes(m.vsize)
        rows = range(abi.stats_index(slot, 0, 0), abi.stats_index(slot + 1, 0, 0))
        m.update_many([(bytes(ct.c_uint32(i)), zero) for i in rows])
        tx = self.maps["xf_port_tx"]
        tx.update_many([(bytes(ct.c_uint32(slot)), bytes(tx.vsize))])

    def rule_stats(self) -> Dict[int, Tuple[int, int]]:
        """Rule id -> (classifications it decided: flows set up, packets judged; and the
        coarse-clock ns of the last one), for the rules in the datapath."""
        m = self.maps["xf_rule_hits"]
        out = {}
        for k, v in m.items():
            rid = ct.c_uint32.from_buffer_copy(k).value
            if rid in self._rule_slots:
                cpus = [abi.RuleStat.from_buffer_copy(c) for c in m.per_cpu(v)]
                out[rid] = (sum(c.hits for c in cpus), max(c.last_hit_ns for c in cpus))
        return out

    def rule_hits(self) -> Dict[int, int]:
        """Classifications (flows set up, packets judged) per rule in the datapath."""
        return {rid: hits for rid, (hits, _) in self.rule_stats().items()}

    def monitor_maps(self) -> Tuple[int, RawMap, RawMap]:
        """The monitor's ring buffer fd, its switch-and-filter map and per-CPU counters
        (maps of the loaded program, not pinned)."""
        return (self._own_maps["xf_events"], RawMap(self._own_maps["xf_mon"], "xf_mon"),
                RawMap(self._own_maps["xf_mon_cpu"], "xf_mon_cpu"))
    def _counter_rows(self, name: str, wanted: Set[int]) -> Dict[int, Tuple[int, int]]:
        """(packets, bytes) summed over CPUs of the wanted rows of a per-CPU counter array."""
        m = self.maps[name]
        out = {}
        for k, v in m.items():
            idx = ct.c_uint32.from_buffer_copy(k).value
            if idx in wanted:
                words = memoryview(v).cast("Q")        # per CPU: packets, bytes
                out[idx] = (sum(words[0::2]), sum(words[1::2]))
        return out

    def rule_counters(self) -> Dict[int, Tuple[int, int]]:
        """rule id -> (packets, bytes) it decided, flow-table hits included."""
        rows = self._counter_rows("xf_rule_stats", {s for s in self._rule_slots.values() if s})
        return {rid: rows.get(slot, (0, 0)) for rid, slot in self._rule_slots.items()}

    def nat_counters(self) -> Dict[Tuple[int, int], Tuple[int, int]]:
        """(tenant id, abi.NATC_* kind) -> (packets, bytes): NAT's translations and SNAT
        port exhaustions."""
        out = {}
        for k, v in self.maps["xf_nat_stats"].items():
            key = ct.c_uint32.from_buffer_copy(k).value
            words = memoryview(v).cast("Q")            # per CPU: packets, bytes
            out[(key >> 8, key & 0xFF)] = (sum(words[0::2]), sum(words[1::2]))
        return out

    def port_tx(self, slots: Set[int]) -> Dict[int, Tuple[int, int]]:
        """port slot -> (packets, bytes) it transmitted on redirect."""
        rows = self._counter_rows("xf_port_tx", set(slots))
        return {s: rows.get(s, (0, 0)) for s in slots}

    # -- packets ----------------------------------------------------------------------------
    def run(self, packet: bytes, ifindex: int, repeat: int = 1) -> Tuple[int, bytes, int]:
        return bpfsys.test_run(self.prog_fd, packet, ifindex=ifindex, repeat=repeat)

    def trace(self, packet: bytes, ifindex: int) -> Tuple[int, bytes, abi.Trace]:
        """Dry run through the trace build: what the datapath would do, with no flow
        installed and no counter touched."""
        fd = self.load_trace()
        rec = RawMap(self._trace_rec, "xf_trace_rec")
        zero = bytes(ct.c_uint32(0))
        rec.put(zero, bytes(rec.vsize))
        rc, out, _ = bpfsys.test_run(fd, packet, ifindex=ifindex)
        records = [abi.Trace.from_buffer_copy(v) for v in rec.per_cpu(rec.get(zero))]
        written = [t for t in records if t.verdict or t.reason]
        return rc, out, written[0] if written else abi.Trace()

