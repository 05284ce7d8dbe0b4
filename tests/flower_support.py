"""Test helpers for the Flower adapter: an in-process grid that can corrupt or drop
replies, and a SuperLink + SuperNodes deployment on 127.0.0.1 that is always torn down."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

BIN = Path(sys.executable).parent
READY_S = 60.0  # for the SuperLink to listen (imports take seconds, more on a busy machine)


Fault = Callable[[Message, Message], Message | None]  # (reply, message) -> reply or None


# What the Grid methods that FedHQStrategy never calls say when called anyway.
UNUSED = "LocalGrid is a test double of Grid's messaging and get_node_ids only"


class LocalGrid(Grid):
    """Sends each message straight to ``app`` in this process with its node's
    Context (the i-th node holds partition i). ``faults[partition](reply, message)``
    may change a node's reply, replace it or drop it (None: a node that never
    answers). A ClientApp that raises gets an error reply, as Flower's runtimes give.
    ``arrive(replies)`` picks which of the replies that are in a pull returns, in what
    order (default: all, in the order they were pushed)."""

    def __init__(
        self,
        app,
        partitions: int,
        faults: dict[int, Fault] | None = None,
        arrive: Callable[[list[Message]], list[Message]] = list,
    ):
        self.app, self.faults, self.arrive = app, faults or {}, arrive
        self.inbox: list[Message] = []  # replies not pulled yet
        self.pulls = 0
        # Flower 1.41's Message() reads the task's identity, which its runtimes set
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
        self.contexts = {
            1000 + i: Context(
                run_id=1,
                node_id=1000 + i,
                node_config={"partition-id": i, "num-partitions": partitions},
                state=RecordDict(),
                run_config={},
            )
            for i in range(partitions)
        }

    # Grid's other abstract methods: run_on_grid never calls them, so they refuse, saying so.
    def set_run(self, run) -> None:
        raise NotImplementedError(UNUSED)

    @property
    def run(self):
        raise NotImplementedError(UNUSED)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        raise NotImplementedError("deprecated in Flower: messages are built with Message(...)")

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what Flower's grids do on push
            ids.append(msg.metadata.message_id)
            context = self.contexts[msg.metadata.dst_node_id]
            try:
                reply = self.app(msg, context)
            except Exception as error:  # noqa: BLE001 - the runtime's behaviour
                reply = Message(Error(code=0, reason=f"{type(error).__name__}: {error}"), reply_to=msg)
            fault = self.faults.get(context.node_config["partition-id"])
            reply = fault(reply, msg) if fault else reply
            if reply is not None:
                self.inbox.append(reply)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        self.pulls += 1
        wanted = set(message_ids)
        pulled = self.arrive([r for r in self.inbox if r.metadata.reply_to_message_id in wanted])
        self.inbox = [r for r in self.inbox if all(r is not p for p in pulled)]
        return pulled

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        ids, replies = self.push_messages(messages), []
        while batch := self.pull_messages(ids):
            replies += batch
        return replies


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc); taken before anything is stopped,
    while none has been reparented yet."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class LocalDeployment:
    """A SuperLink and one SuperNode per ``node_configs`` entry on 127.0.0.1 (insecure,
    free ports, runtime dependency installation off), each in its own process group.
    ``run_app`` runs ``flwr run`` against them; leaving the ``with`` block stops every
    process started, their descendants included (SuperExec and app processes, some
    started in sessions of their own), SIGTERM then SIGKILL."""

    def __init__(self, home: Path, node_configs: list[str], env: dict[str, str]):
        self.home, self.node_configs = home, node_configs
        self.env = {**os.environ, **env, "FLWR_HOME": str(home / "flwr-home")}
        self.port = free_port()
        self.processes: list[subprocess.Popen] = []

    def _start(self, name: str, *args: str) -> None:
        log = open(self.home / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        self.processes.append(
            subprocess.Popen(
                [str(BIN / args[0]), *args[1:]],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.home,
                start_new_session=True,
            )
        )
        log.close()

    def __enter__(self) -> LocalDeployment:
        (self.home / "flwr-home").mkdir(parents=True, exist_ok=True)
        (self.home / "flwr-home" / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        try:
            self._start(
                "superlink",
                "flower-superlink",
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--disable-runtime-dependency-installation",
            )
            self._wait_for_port(self.port, READY_S)
            for i, node_config in enumerate(self.node_configs):
                self._start(
                    f"supernode{i}",
                    "flower-supernode",
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{self.port}",
                    "--port",
                    str(free_port()),
                    "--node-config",
                    node_config,
                )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_for_port(self, port: int, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.processes[-1].poll() is not None:
                raise RuntimeError(f"the SuperLink exited early:\n{self.log('superlink')}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"the SuperLink did not listen on port {port} within {wait_s} s:\n{self.log('superlink')}")

    def run_app(
        self, app_dir: Path, run_config: str, timeout_s: float, on_line: Callable[[str], None] = lambda line: None
    ) -> tuple[int, str]:
        """``flwr run --stream``, which returns when the run ends: (exit code, output).
        ``on_line`` sees each output line as it comes (the ServerApp's log among them);
        past ``timeout_s`` the ``flwr`` process is killed."""
        proc = subprocess.Popen(
            [str(BIN / "flwr"), "run", str(app_dir), "local", "--stream", "--run-config", run_config],
            env=self.env,
            cwd=self.home,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        watchdog = threading.Timer(timeout_s, proc.kill)
        watchdog.start()
        lines = []
        try:
            for line in proc.stdout:
                lines.append(line)
                on_line(line)
        finally:
            watchdog.cancel()
            proc.stdout.close()
            code = proc.wait()
        return code, "".join(lines)

    def stop_node(self, index: int) -> None:
        """SIGTERM to SuperNode ``index`` and every process below it: a node that goes away."""
        node = self.processes[1 + index]
        for pid in [node.pid, *descendants(node.pid)]:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def log(self, name: str) -> str:
        path = self.home / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __exit__(self, *exc) -> None:
        tree = [pid for p in self.processes for pid in [p.pid, *descendants(p.pid)]]
        for sig, grace_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for pid in tree:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace_s
            for p in self.processes:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            while time.monotonic() < deadline and any(_alive(pid) for pid in tree):
                time.sleep(0.1)
            if not any(_alive(pid) for pid in tree):
                break
        self.survivors = [pid for pid in tree if _alive(pid)]


def _alive(pid: int) -> bool:
    """Running (a zombie left for its parent to reap counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
