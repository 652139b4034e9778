"""Queue a Live Avatar API workflow on a ComfyUI server, wait for it, and download the MP4.

Standard library only. See README.md in this folder.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

IMAGE_NODE, AUDIO_NODE, TEXT_NODE = "1", "2", "4"


def upload(server: str, path: Path) -> str:
    """POST /upload/image (ComfyUI's generic upload, audio included); returns the stored name."""
    boundary = uuid.uuid4().hex
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{path.name}\"\r\n"
            f"Content-Type: {kind}\r\n\r\n").encode() + path.read_bytes() + (
            f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\ntrue\r\n"
            f"--{boundary}--\r\n").encode()
    request = urllib.request.Request(f"{server}/upload/image", body,
                                     {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    info = json.load(urllib.request.urlopen(request))
    return f"{info['subfolder']}/{info['name']}" if info.get("subfolder") else info["name"]


def queue(server: str, prompt: dict) -> str:
    request = urllib.request.Request(f"{server}/prompt", json.dumps({"prompt": prompt}).encode(),
                                     {"Content-Type": "application/json"})
    try:
        return json.load(urllib.request.urlopen(request))["prompt_id"]
    except urllib.error.HTTPError as exc:
        sys.exit(f"ComfyUI refused the workflow:\n{json.dumps(json.load(exc), indent=2)}")


def wait(server: str, prompt_id: str, poll_s: float) -> dict:
    while True:
        history = json.load(urllib.request.urlopen(f"{server}/history/{prompt_id}"))
        if prompt_id in history:
            return history[prompt_id]
        time.sleep(poll_s)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", default="http://127.0.0.1:8188")
    parser.add_argument("--workflow", type=Path, required=True, help="an API-format json from workflows/api/")
    parser.add_argument("--image", type=Path, help="reference image to upload")
    parser.add_argument("--audio", type=Path, help="speech to upload")
    parser.add_argument("--prompt", help="text prompt")
    parser.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=JSON")
    parser.add_argument("--out", type=Path, help="where to save the MP4")
    parser.add_argument("--poll", type=float, default=2.0, help="seconds between /history polls")
    args = parser.parse_args(argv)
    server = args.server.rstrip("/")

    prompt = json.loads(args.workflow.read_text())
    if args.image:
        prompt[IMAGE_NODE]["inputs"]["image"] = upload(server, args.image)
    if args.audio:
        prompt[AUDIO_NODE]["inputs"]["audio"] = upload(server, args.audio)
    if args.prompt is not None:
        prompt[TEXT_NODE]["inputs"]["prompt"] = args.prompt
    for item in args.set:
        target, _, value = item.partition("=")
        node, _, name = target.partition(".")
        prompt[node]["inputs"][name] = json.loads(value)

    prompt_id = queue(server, prompt)
    print(f"queued {prompt_id}")
    entry = wait(server, prompt_id, args.poll)
    status = entry["status"]
    if status.get("status_str") != "success":
        errors = [m[1] for m in status.get("messages", []) if m[0] in ("execution_error", "execution_interrupted")]
        sys.exit(f"the run did not finish: {json.dumps(errors, indent=2)}")
    for output in entry["outputs"].values():
        for file in output.get("images", []):
            query = urllib.parse.urlencode(file)
            print(f"video: {server}/view?{query}")
            if args.out:
                args.out.write_bytes(urllib.request.urlopen(f"{server}/view?{query}").read())
                print(f"saved {args.out}")


if __name__ == "__main__":
    main()
