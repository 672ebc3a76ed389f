"""A real ComfyUI server on 127.0.0.1, for the API tests and the examples command: started from a
ComfyUI folder with a base directory of its own (models, custom_nodes, output), fed API workflows
through POST /prompt and followed on /history."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path


def request(url: str, payload: dict | None = None):
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


class Server:
    """A real ComfyUI server on 127.0.0.1 with `base` as its base directory."""

    def __init__(self, comfy_path: Path, base: Path, timeout: float = 300, say: Callable[[str], None] = lambda message: None):
        self.comfy_path, self.base, self.timeout, self.say = comfy_path, base, timeout, say
        self.log_path = base / "comfyui-server.log"

    def __enter__(self) -> Server:
        import torch

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        (self.base / "web").mkdir(exist_ok=True)  # the API needs no frontend
        command = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(self.base)]
        command += ["--front-end-root", str(self.base / "web"), "--disable-auto-launch"]
        if not torch.cuda.is_available():
            command.append("--cpu")
        env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
        self.say(f"starting ComfyUI ({self.comfy_path}) on port {port}, log: {self.log_path}")
        with open(self.log_path, "w") as out:
            self.process = subprocess.Popen(command, cwd=self.comfy_path, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{port}"
        started, deadline = time.monotonic(), time.monotonic() + 240
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.tail()}")
                try:
                    status, info = request(f"{self.url}/object_info/TGate")
                    if status == 200 and "TGate" in info:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"ComfyUI did not serve TGate within 240 s:\n{self.tail()}")
                time.sleep(1)
        except BaseException:
            self.__exit__()
            raise
        self.say(f"server ready in {time.monotonic() - started:.0f} s")
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.is_file() else ""

    def run(self, workflow: dict) -> tuple[float, list]:
        """Queue `workflow`, wait for it; (seconds ComfyUI spent executing it, files it saved in output/)."""
        status, queued = request(f"{self.url}/prompt", {"prompt": workflow, "client_id": "tgate-examples"})
        if status != 200:
            raise RuntimeError(f"/prompt refused the workflow ({status}): {json.dumps(queued)[:2000]}")
        prompt_id, submitted = queued["prompt_id"], time.monotonic()
        while True:
            status, history = request(f"{self.url}/history/{prompt_id}")
            entry = history.get(prompt_id) if status == 200 and history else None
            state = (entry or {}).get("status", {})
            if state.get("status_str") == "error":
                messages = [m[1] for m in state.get("messages", []) if m[0] == "execution_error"]
                detail = messages[0].get("exception_message", "").strip() if messages else ""
                raise RuntimeError(f"execution error: {detail or state}")
            if state.get("completed"):
                break
            if time.monotonic() - submitted > self.timeout:
                raise RuntimeError(f"did not finish in {self.timeout:.0f} s")
            time.sleep(0.2)
        stamps = {m[0]: m[1].get("timestamp") for m in state.get("messages", [])}
        if stamps.get("execution_start") and stamps.get("execution_success"):
            seconds = (stamps["execution_success"] - stamps["execution_start"]) / 1000
        else:
            seconds = time.monotonic() - submitted
        saved = []
        for output in entry.get("outputs", {}).values():
            for item in [*output.get("images", []), *output.get("videos", []), *output.get("gifs", [])]:
                # Saved files only: PreviewImage's go to ComfyUI's temp folder (type "temp"), not to output/.
                if isinstance(item, dict) and "filename" in item and item.get("type", "output") == "output":
                    saved.append(str(Path(item.get("subfolder", ""), item["filename"])))
        return seconds, saved
