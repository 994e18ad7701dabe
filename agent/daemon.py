"""xdpflow-agent: wiring and the main loop. Signal handlers only record the signal; the
loop acts on it (reload, stop), pings the systemd watchdog, ages flows, and reconciles when
interfaces change. On exit the programs stay attached and the maps pinned (hitless
restart) unless a teardown is asked for."""
from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import sys
import threading
import time

from . import VERSION, config as config_mod, model, notify
from .config import ConfigError
from .child import die_with

log = logging.getLogger("xdpflow.agent")

EXAMPLES = """examples:
  xdpflow-agent --config /etc/xdpflow/agent.toml            run in the foreground
  xdpflow-agent --config /etc/xdpflow/agent.toml --check    validate the config, exit 0 or 2
  xdpflow-agent --config /etc/xdpflow/agent.toml --teardown detach from every port, unpin maps
"""


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="xdpflow-agent", description="The xdpflow node agent (XDP datapath owner).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="FILE", help="TOML config file")
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    p.add_argument("--teardown", action="store_true",
                   help="detach from every port, remove the pinned maps, and exit; refused, "
                        "changing nothing, when a configured port's interface cannot be "
                        "found (run it in the agent's network namespace)")
    p.add_argument("--force", action="store_true",
                   help="with --teardown: go ahead although some ports' interfaces cannot "
                        "be found (they are gone for good)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   help="override [agent] log_level")
    p.add_argument("--version", action="version", version=f"xdpflow-agent {VERSION}")
    return p.parse_args(argv)


class Agent:
    def __init__(self, cfg, config_path: str):
        self.cfg = cfg
        self.config_path = config_path
        self.lock = threading.RLock()
        self.signals = []
        self.store = self.dp = self.links = self.controller = None
        self.api = self.metrics = self.watcher = None
        from .timings import Timings
        self.timings = Timings()   # shared by the controller and the API server
        self._links_dirty = threading.Event()
        self._links_lost = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        # A cold start's stored state, read while its datapath compiles (see _compile).
        self._loaded = None
        self._stopping = False      # set by stop(): a start-up behind it starts nothing more

    # -- start-up ---------------------------------------------------------------------------
    def start(self):
        from .control import Controller
        from .datapath import Datapath, ensure_bpffs
        from .store import Store

        if ensure_bpffs():
            log.info("mounted bpffs on /sys/fs/bpf")
        os.makedirs(self.cfg.agent.state_dir, mode=0o750, exist_ok=True)
        self.store = Store.open(os.path.join(self.cfg.agent.state_dir, "state.db"))
        self.dp = Datapath(self.cfg.agent.bpffs, self.cfg.datapath_defines())
        # An adopted datapath's maps are read by the start-up's second half.
        report = self.dp.load(read_maps=False, compile=False)
        if self.dp.how != "adopted":
            report = self._compile()
        self._log_pins(report)
        from .datapath import pass_program
        self._pass_fd = pass_program(self.dp.pin_dir, adopt=True)
        # Netlink (pyroute2) comes with the start-up's second half: a warm start answers
        # without importing it.
        self.controller = Controller(self.cfg, self.store, self.dp, None,
                                     pass_fd=self._pass_fd, config_path=self.config_path,
                                     lock=self.lock, load=False)
        self._use_bpf_stats(self.cfg.metrics.bpf_stats)
        self.controller.timings = self.timings
        adopted = self.dp.how == "adopted"
        if adopted:
            # The pinned program keeps forwarding on its maps: answer first, load the
            # stored state and check it against the maps behind the lock (every command
            # but status waits for it; scrapes get what needs no state, see
            # metrics.AgentSource).
            self._start_up_behind()
        else:
            self._start_up()     # nothing of ours forwards yet: ready once programmed
        self._start_api()
        # Listening as soon as the API answers: a restart is not a down target.
        self._start_metrics()
        if not adopted:
            self._start_watching()

    def _start_watching(self):
        """The link watcher (after the start-up: its events are reconciled against a
        loaded state)."""
        from .links import LinkWatcher
        self.watcher = LinkWatcher(self._mark_links_dirty,
                                   neighbour_wanted=self.links.wants_neighbour)
        self.watcher.start()

    def _start_up(self):
        """The start-up's second half, holding the lock: the stored state loaded (and
        seeded from the config on a first start), checked against the maps (agent/
        digest.py: skipped when the pinned digest matches, else a reconcile), flows
        counted."""
        from .links import Links
        t0 = time.monotonic()
        c = self.controller
        with self.lock:
            self.links = c.links = Links()
            self.dp.read_mirror()
            c.load_state(self._loaded)
            self._loaded = None
            c.startup["phase"] = "checking the maps"
            how = None
            if self.store.get_meta("seeded") is None:
                if any(getattr(self.cfg.state, k) for k in model.KINDS):
                    c.apply(self.cfg.state.to_dict(), dry_run=False, prune=True)
                    log.info("initial state from %s applied", self.config_path)
                self.store.set_meta("seeded", "1")
                c.reconcile("start")
                how = "reconciled: first start"
            how = how or c.check_start()
            c.sweeper.sweep()
            c.start_done(how, time.monotonic() - t0)

    def _start_up_behind(self):
        """_start_up in a thread that holds the lock before this returns."""
        holding = threading.Event()

        def run():
            try:
                with self.lock:
                    holding.set()
                    self._start_up()
                    if self._stopping:
                        return
                    self._start_watching()
                log.info("start-up done in %.3fs: %s", self.controller.startup["seconds"],
                         self.controller.startup["reconcile"])
                self._wake("s")     # the loop's sweeps and link reconciles may begin
            except BaseException as e:
                # Serving an empty state would let a change erase the stored one: the
                # process ends with the lock held (pins and programs left as they are).
                log.exception("start-up failed")
                notify.status(f"start-up failed: {e}")
                for h in logging.getLogger().handlers:
                    h.flush()
                os._exit(1)

        threading.Thread(target=run, name="start-up", daemon=True).start()
        holding.wait()

    def _log_pins(self, report):
        by = {}
        for st in report:
            by.setdefault(st.action, []).append(st.name + (f" ({st.detail})" if st.detail else ""))
        for action in ("reuse", "create", "migrate", "rebuild"):
            if by.get(action):
                log.info("pinned maps under %s: %s %s", self.dp.pin_dir,
                         {"reuse": "reusing", "create": "creating", "migrate": "migrating",
                          "rebuild": "rebuilding"}[action], ", ".join(by[action]))

    def _compile(self):
        """A start that cannot adopt the pinned program (first start, upgrade, new sizes):
        a child process compiles and pins the datapath and the pass program, then exits,
        and this one adopts what it pinned. The compiler's libraries (LLVM and clang,
        about 80 MiB resident) and the compile's heap never enter the agent, and the
        stored state is read meanwhile, on the other core (100,000 rules: seconds).
        Returns the adoption's pin report; `status` says this start compiled, and how long
        the compile and load took (the child's own figure: it writes that, or its error,
        to a pipe)."""
        from .datapath import pass_program
        r, w = os.pipe()
        parent = os.getpid()
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:
            code, said = 1, b""
            try:
                os.close(r)
                die_with(parent)
                self._log_pins(self.dp.load(read_maps=False))
                os.close(pass_program(self.dp.pin_dir, adopt=False))
                log.info("datapath compiled and pinned in %.2fs (a child process: pid %d)",
                         time.monotonic() - t0, os.getpid())
                code, said = 0, f"{self.dp.load_seconds:.3f}".encode()
            except BaseException as e:
                log.exception("compiling the datapath failed")
                said = f"{type(e).__name__}: {e}".encode()
            finally:
                os.write(w, said[:4000])
                for h in logging.getLogger().handlers:
                    h.flush()
                os._exit(code)
        os.close(w)
        try:
            # Nothing else uses the store yet, and the child never does.
            self._loaded = self.store.load_with_digest()
        finally:
            _, status = os.waitpid(pid, 0)
            with os.fdopen(r, "rb") as f:
                said = f.read().decode(errors="replace")
        if status != 0:
            said = said or f"the compiling process ended with wait status {status}"
            raise RuntimeError(f"compiling the datapath failed: {said}")
        # Adopts what the child pinned (failing that, the log says why, and it compiles
        # here after all).
        report = self.dp.load(read_maps=False)
        if self.dp.how == "adopted":
            self.dp.how, self.dp.load_seconds = "compiled", float(said)
        return report

    def _start_api(self):
        from .api import ApiServer
        a = self.cfg.agent
        self.api = ApiServer(self.controller, a.socket, socket_group=a.socket_group,
                             admin_group=a.admin_group, max_request_bytes=a.max_request_bytes,
                             request_timeout=a.request_timeout, lock=self.lock,
                             timings=self.timings)
        self.api.start()
        log.info("control API on %s", a.socket)

    def _start_metrics(self):
        from .metrics import AgentSource, DatapathCollector, serve
        addr = self.cfg.metrics_address()
        if addr is None:
            return
        self.metrics = serve(DatapathCollector(AgentSource(self.controller),
                                               self.timings), *addr)
        log.info("metrics on http://%s:%d/metrics", self.metrics.host, self.metrics.port)

    def _use_bpf_stats(self, wanted: bool):
        """Kernel BPF statistics on or off as [metrics] bpf_stats says (start, reload)."""
        from .bpfstats import BpfStats
        old = self.controller.bpf_stats
        if old is not None and old.wanted == wanted:
            return
        with self.lock:
            self.controller.bpf_stats = BpfStats(wanted)
        if old is not None:
            old.close()

    def _mark_links_dirty(self, why: str = "link"):
        """From the watcher's thread: every port is reconciled by the loop, whatever the
        event (and after lost events, when nothing says what changed)."""
        if why == "lost":
            self._links_lost.set()
        self._links_dirty.set()
        self._wake("l")

    def _wake(self, why: str) -> None:
        try:
            os.write(self._wake_w, why.encode())
        except BlockingIOError:
            pass

    # -- the loop ------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        self.signals.append(signum)    # acted on by the loop, never here

    def run(self) -> int:
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, self._on_signal)
        signal.set_wakeup_fd(self._wake_w)
        wd = notify.watchdog_interval()
        notify.ready("loading the stored state" if not self.controller.startup["done"] else
                     f"serving {len(self.controller.state.ports)} ports")
        log.info("ready (xdpflow %s, pid %d)", VERSION, os.getpid())
        next_sweep = time.monotonic() + self.cfg.aging.interval
        next_wd = time.monotonic()
        while True:
            now = time.monotonic()
            if wd and now >= next_wd:
                notify.watchdog()
                next_wd = now + wd / 2
            # While a warm start loads its state (holding the lock), sweeps and link
            # reconciles wait: the start-up sweeps, and wakes the loop when done.
            starting = not self.controller.startup["done"]
            if now >= next_sweep and starting:
                next_sweep = now + self.cfg.aging.interval
            elif now >= next_sweep:
                self._guarded("sweep", self._sweep)
                # A sweep of a full table takes seconds in Python: never spend more than
                # about a third of a core on it, whatever the configured interval.
                next_sweep = time.monotonic() + max(self.cfg.aging.interval,
                                                    2 * self.controller.sweeper.last_seconds)
            while self.signals:
                sig = self.signals.pop(0)
                if sig == signal.SIGHUP:
                    self._guarded("reload", self.reload)
                else:
                    log.info("signal %s: stopping", signal.Signals(sig).name)
                    return self.stop()
            if self._links_dirty.is_set() and not starting:
                self._links_dirty.clear()
                self._guarded("link change", self._reconcile_links)
            timeout = max(0.0, min(next_sweep, next_wd if wd else next_sweep) - time.monotonic())
            r, _, _ = select.select([self._wake_r], [], [], timeout)
            if r:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass

    def _guarded(self, what, fn):
        try:
            fn()
        except Exception:
            log.exception("%s failed", what)

    def _sweep(self):
        # The sweeper holds the lock a slice at a time: the API answers during a sweep.
        done = self.controller.sweeper.sweep(self.lock)
        if done:
            log.debug("sweep evicted %s", ", ".join(f"{n} {why}" for why, n in done.items()))

    def _reconcile_links(self):
        why = "link events lost" if self._links_lost.is_set() else "link change"
        self._links_lost.clear()
        with self.lock:
            self.controller.reconcile(why)

    def reload(self):
        """SIGHUP: read the config again and apply what changed."""
        notify.reloading()
        try:
            new = config_mod.load(self.config_path)
        except ConfigError as e:
            log.error("reload refused, keeping the running config: %s", e)
            notify.ready()
            return
        old = self.cfg
        with self.lock:
            if new.datapath != old.datapath:
                try:
                    self._rebuild_datapath(new)
                except Exception:
                    log.exception("reload refused: the datapath with the new [datapath] "
                                  "sizes could not be built and programmed; the running one "
                                  "is kept, with the running config")
                    notify.ready()
                    return
            self.cfg = new
            self.controller.use_config(new)
            from .control import file_sha256
            self.controller.config_sha256 = file_sha256(self.config_path)
            if new.state.to_dict() != old.state.to_dict():
                self._apply_state_change(old.state, new.state)
        if new.agent != old.agent:
            logging.getLogger().setLevel(new.agent.log_level.upper())
            if (new.agent.socket, new.agent.socket_group, new.agent.admin_group) != \
                    (old.agent.socket, old.agent.socket_group, old.agent.admin_group):
                self.api.stop()
                self._start_api()
        if new.metrics != old.metrics:
            self._use_bpf_stats(new.metrics.bpf_stats)
            if self.metrics:
                self.metrics.shutdown()
                self.metrics = None
            self._start_metrics()
        log.info("reloaded %s", self.config_path)
        notify.ready()

    def _apply_state_change(self, old_seed: model.State, new_seed: model.State):
        """The config's [state] changed: apply that difference to the live state."""
        cur = self.controller.state
        target = cur.copy()
        d = model.diff(old_seed, new_seed)
        for kind, typ in model.KINDS.items():
            items = {model.identity(kind, o): o for o in getattr(target, kind)}
            for o in d[kind]["remove"]:
                items.pop(model.identity(kind, typ.from_dict(o)), None)
            for o in d[kind]["add"] + [c["to"] for c in d[kind]["change"]]:
                obj = typ.from_dict(o)
                items[model.identity(kind, obj)] = obj
            setattr(target, kind, list(items.values()))
        from .api import audit_log
        # The target is the whole state: what the config no longer names goes.
        d = self.controller.apply(target.to_dict(), dry_run=False, prune=True)
        n = model.count_changes(d)
        audit_log.info("SIGHUP: reload of %s's [state]: ok, %d change%s", self.config_path,
                       n, "" if n == 1 else "s")

    def _rebuild_datapath(self, new_cfg):
        """Map sizes changed: build the new program beside the running one (all-new
        configuration maps if any of them changed, see Datapath.load), program it from
        the store, replace the program on every port in one step each, then move the pins
        in place. If anything fails before that, the running program, its maps and pins
        stay as they were (and ports already moved get it back)."""
        from .datapath import Datapath
        old_dp, old_cfg = self.dp, self.cfg
        dp = Datapath(new_cfg.agent.bpffs, new_cfg.datapath_defines())
        try:
            self._log_pins(dp.load(beside=True))
            self.controller.use_datapath(dp, new_cfg)
        except Exception:
            try:
                self.controller.use_datapath(old_dp, old_cfg)
            finally:
                dp.close()
                dp.discard_staged()
            raise
        dp.commit_pins()
        self.dp = dp
        old_dp.close()

    def stop(self) -> int:
        notify.stopping()
        self._stopping = True
        with self.lock:
            pass            # a start-up still loading finishes first (and starts no watcher)
        for part in (self.watcher, self.api):
            if part:
                try:
                    part.stop()
                except Exception:
                    log.exception("stopping %s", part)
        if self.metrics:
            self.metrics.shutdown()
        if self.controller:
            self.controller.monitor.close()     # the datapath left running makes no events
        with self.lock:
            if self.cfg.agent.teardown_on_exit:
                teardown(self.cfg, self.links, self.controller.state)
            else:
                log.info("leaving the datapath attached and its maps pinned: traffic keeps "
                         "flowing; the next agent adopts them")
        if self.links:
            # pyroute2 runs an asyncio loop under its socket: left open, its tasks are
            # destroyed pending at exit and asyncio logs an ERROR on every stop.
            self.links.close()
        if self.controller:
            self.controller.writer.close()
        if self.store:
            self.store.close()
        return 0


class TeardownRefused(Exception):
    pass


def missing_ports(links, state) -> list:
    """The configured ports whose interfaces this network namespace does not have."""
    return [p.name for p in state.ports if links.get(p.name) is None]


def teardown(cfg, links=None, state=None, force: bool = True) -> None:
    """Detach from every configured port (and our pass program from veth peers), then
    remove the pinned maps. Without `force`, first make sure every configured port is
    found: from another network namespace the ports are invisible, and removing the pins
    would leave the programs attached with no agent able to adopt them."""
    from .datapath import Datapath
    from .links import Links
    from .store import Store
    own_links = links is None
    links = links or Links()
    if state is None:
        path = os.path.join(cfg.agent.state_dir, "state.db")
        state = Store.open(path).load() if os.path.exists(path) else model.State()
    try:
        missing = [] if force else missing_ports(links, state)
        if missing:
            ns = os.readlink("/proc/self/ns/net")
            raise TeardownRefused(
                f"refusing to tear down: port{'s' if len(missing) > 1 else ''} "
                f"{', '.join(missing)} not found in this network namespace ({ns}); nothing "
                "was changed. Run it where the agent runs (e.g. nsenter --net=/run/netns/NS "
                "xdpflow-agent --config ... --teardown), or add --force if those interfaces "
                "are gone for good")
        for p in state.ports:
            link = links.get(p.name)
            if link is None:
                continue
            if links.detach(link):
                log.info("port %s: detached", p.name)
            try:
                links.unprepare_peer(link)
            except Exception as e:
                log.warning("port %s: peer program left in place: %s", p.name, e)
    finally:
        if own_links:
            links.close()
    Datapath(cfg.agent.bpffs).unpin()
    log.info("removed pinned maps under %s", cfg.agent.bpffs)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = config_mod.load(args.config)
    except ConfigError as e:
        print(f"xdpflow-agent: {e}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{args.config}: ok")
        return 0
    logging.basicConfig(level=(args.log_level or cfg.agent.log_level).upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if os.geteuid() != 0:
        print("xdpflow-agent: needs root (BPF, netlink, bpffs)", file=sys.stderr)
        return 1
    if args.teardown:
        try:
            teardown(cfg, force=args.force)
        except TeardownRefused as e:
            print(f"xdpflow-agent: {e}", file=sys.stderr)
            return 1
        return 0
    agent = Agent(cfg, args.config)
    try:
        agent.start()
    except Exception as e:
        log.exception("start-up failed")
        notify.status(f"start-up failed: {e}")
        return 1
    return agent.run()


if __name__ == "__main__":
    sys.exit(main())
