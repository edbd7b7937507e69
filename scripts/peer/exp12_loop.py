#!/usr/bin/env python3
"""The Python peer of `miniwob-steer bench episodes`: the exp12 reference loop re-implemented the
way it is usually written: transformers (f32, eager) + a forward hook on decoder layer L that adds
coeff * v at the last position (prefill) and at every generated token, selenium driving Chromium
through chromedriver, and a sequential loop: for each (task, seed), the baseline episode, then the
steered one, each with its own reset, observation, prompt, greedy generation, parse, act, reward.

Same tasks, seeds, steering vector (the safetensors file `miniwob-steer` computed, tensor
`layer.{L}`), prompt text (src/agent/prompt.rs and src/env/dom.rs, ported below), token budget and
action grammar as the Rust side. Prints one JSON line with the evaluation wall time (model load and
browser start excluded) and paired episodes per minute.
"""

import argparse
import functools
import http.server
import json
import os
import re
import threading
import time

import torch
from safetensors.torch import load_file
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from transformers import AutoModelForCausalLM, AutoTokenizer

INSTRUCTION = """You are a web agent. Complete the task on the web page below by answering with actions.

Actions (one per line, nothing else):
click ref=N
type ref=N text="TEXT"
select ref=N option="TEXT"
N is the ref number of an element in the list below."""
ANSWER = "Answer with the action line(s) only."
MAX_TEXT = 120
MAX_ELEMENTS = 120

RESET_JS = """
var seed = arguments[0], mode = arguments[1], maxTime = arguments[2];
core.endEpisode(0);
if (document.activeElement && document.activeElement !== document.body && document.activeElement.blur) document.activeElement.blur();
Math.seedrandom(seed);
core.setDataMode(mode);
core.EPISODE_MAX_TIME = maxTime;
core.startEpisodeReal();
return true;
"""
READY_JS = "return (typeof WOB_TASK_READY === 'undefined') ? true : !!WOB_TASK_READY;"
OBSERVE_JS = """
var u = core.getUtterance();
var dom = core.getDOMInfo();
var extra = {};
for (var r in core.previousDOMInfo) {
  var el = core.previousDOMInfo[r];
  if (el instanceof HTMLSelectElement) {
    var opts = [];
    for (var i = 0; i < el.options.length; i++) opts.push(el.options[i].text.replace(/\\s+/g, ' ').trim());
    extra[r] = {options: opts, selected: el.selectedIndex >= 0 ? opts[el.selectedIndex] : null};
  } else if (typeof el.className !== 'string') {
    extra[r] = {cls: (el.className && typeof el.className.baseVal === 'string') ? el.className.baseVal : ''};
  }
}
return {utterance: u, dom: dom, extra: extra};
"""
STATE_JS = "return {done: !!WOB_DONE_GLOBAL, reward: +WOB_REWARD_GLOBAL, raw: +WOB_RAW_REWARD_GLOBAL};"
CLICK_JS = """
var r = arguments[0];
var el = core.previousDOMInfo[r];
if (el === undefined) { core.getDOMInfo(); el = core.previousDOMInfo[r]; }
if (el === undefined) return 'unknown ref';
return core.elementClick(r) === true;
"""
SELECT_JS = """
var r = arguments[0], want = arguments[1];
var el = core.previousDOMInfo[r];
if (el === undefined) { core.getDOMInfo(); el = core.previousDOMInfo[r]; }
if (!(el instanceof HTMLSelectElement)) return false;
for (var i = 0; i < el.options.length; i++) if (el.options[i].text.replace(/\\s+/g, ' ').trim() === want.trim()) {
  el.focus(); el.selectedIndex = i;
  el.dispatchEvent(new Event('input', {bubbles: true})); el.dispatchEvent(new Event('change', {bubbles: true}));
  return true;
}
return false;
"""


def flatten(node, parent, extra, out):
    r = node.get("ref", 0)
    ex = extra.get(str(r))
    value, checked, options = None, None, []
    v = node.get("value")
    if isinstance(v, bool):
        checked = v
    elif isinstance(v, str):
        value = v
    elif isinstance(v, (int, float)):
        value = json.dumps(v)
    if ex and "options" in ex:
        options = ex["options"]
        value = ex.get("selected")
    cls = node.get("classes")
    if not isinstance(cls, str):
        cls = (ex or {}).get("cls", "")
    out.append(dict(ref=r, parent=parent, tag=node.get("tag", ""), text=node.get("text", "") or "", value=value,
                    checked=checked, options=options, id=node.get("id", "") or "", classes=cls or "",
                    focused=bool(node.get("focused")), bg=node.get("bgColor", "") or ""))
    for c in node.get("children", []) or []:
        flatten(c, r, extra, out)


def esc(s):
    out = []
    for i, c in enumerate(s):
        if i == MAX_TEXT:
            out.append("…")
            break
        out.append({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "\n": " ", "\r": " ", "\t": " "}.get(c, c))
    return "".join(out)


def dom_to_text(els):
    parents = {e["parent"] for e in els if e["parent"] is not None}
    lines, shown, omitted = [], 0, 0
    for e in els:
        has_children = e["ref"] in parents
        interactive = e["tag"].startswith("INPUT") or e["tag"] in ("BUTTON", "A", "SELECT", "TEXTAREA", "LABEL", "OPTION")
        informative = e["tag"] != "BODY" and (interactive or e["text"] or e["id"] or e["value"] is not None
                                               or e["checked"] is not None or not has_children)
        if not informative:
            continue
        if shown == MAX_ELEMENTS:
            omitted += 1
            continue
        shown += 1
        tag = e["tag"].lower()
        s = f"<{tag} ref={e['ref']}"
        if e["id"]:
            s += f' id="{esc(e["id"])}"'
        cls = " ".join(e["classes"].split())
        if cls:
            s += f' class="{esc(cls)}"'
        if e["value"] is not None:
            s += f' value="{esc(e["value"])}"'
        if e["checked"] is not None:
            s += " checked=true" if e["checked"] else " checked=false"
        if e["options"]:
            s += f' options="{esc("|".join(e["options"]))}"'
        if not e["text"] and not has_children and e["bg"] not in ("", "transparent", "rgba(0, 0, 0, 0)") and e["value"] is None:
            s += f' bg="{esc(e["bg"])}"'
        if e["focused"]:
            s += " focused"
        s += ">"
        if e["text"]:
            s += esc(e["text"]) + f"</{tag}>"
        lines.append(s + "\n")
    if omitted:
        lines.append(f"<!-- {omitted} more elements left out -->\n")
    return "".join(lines)


def user_text(utterance, els):
    return (INSTRUCTION + "\n\nTask: " + utterance.strip() + "\n" + "\nPage elements:\n" + dom_to_text(els)
            + "\n" + ANSWER)


ACTION_RE = re.compile(r'^(click)[ \t]+ref=(-?\d{1,9})$|^(type)[ \t]+ref=(-?\d{1,9})[ \t]+text="((?:[^"\\]|\\["\\nt])*)"$'
                       r'|^(select)[ \t]+ref=(-?\d{1,9})[ \t]+option="((?:[^"\\]|\\["\\nt])*)"$', re.IGNORECASE)


def unescape(s):
    return re.sub(r'\\(["\\nt])', lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), s)


def parse(text):
    actions = []
    for line in text.splitlines():
        t = line.strip()
        if not t or re.fullmatch(r"`{3,}[A-Za-z0-9_+\-]*", t):
            continue
        m = ACTION_RE.match(t)
        if not m:
            return None
        if m.group(1):
            actions.append(("click", int(m.group(2)), None))
        elif m.group(3):
            actions.append(("type", int(m.group(4)), unescape(m.group(5))))
        else:
            actions.append(("select", int(m.group(7)), unescape(m.group(8))))
    return actions[:8] if actions else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf")
    ap.add_argument("--model-dir")
    ap.add_argument("--vector", required=True)
    ap.add_argument("--layer", type=int, required=True)
    ap.add_argument("--coeff", type=float, default=3.0)
    ap.add_argument("--tasks", required=True)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--html-root", required=True)
    ap.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    if a.gguf:
        d, f = os.path.split(a.gguf)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32, attn_implementation="eager")
    else:
        tok = AutoTokenizer.from_pretrained(a.model_dir)
        model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    v = load_file(a.vector)[f"layer.{a.layer}"].to(torch.float32)
    state = {"coeff": 0.0}

    def hook(m, args, out):
        if state["coeff"] == 0.0:
            return out
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[:, -1] += state["coeff"] * v
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    model.model.layers[a.layer].register_forward_hook(hook)
    stop = [i for i in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")} if isinstance(i, int) and i >= 0]

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=a.html_root)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/miniwob/"

    opts = webdriver.ChromeOptions()
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=500,400"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(a.chromedriver), options=opts)

    def episode(task, seed, coeff):
        if driver.current_url != base + task + ".html":
            driver.get(base + task + ".html")
            while not driver.execute_script("return document.readyState === 'complete' && typeof core !== 'undefined' && !!document.getElementById('sync-task-cover');"):
                time.sleep(0.01)
        driver.execute_script(RESET_JS, seed, "train", 600000)
        while not driver.execute_script(READY_JS):
            time.sleep(0.02)
        obs = driver.execute_script(OBSERVE_JS)
        els = []
        flatten(obs["dom"], None, obs.get("extra") or {}, els)
        u = obs["utterance"] if isinstance(obs["utterance"], str) else (obs["utterance"] or {}).get("utterance", "")
        prompt = tok.apply_chat_template([{"role": "user", "content": user_text(u, els)}], tokenize=False,
                                         add_generation_prompt=True)
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        state["coeff"] = coeff
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=a.max_new_tokens, do_sample=False, eos_token_id=stop,
                                 pad_token_id=stop[0])
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        actions = parse(text)
        if actions:
            for kind, ref, arg in actions:
                if kind == "click":
                    driver.execute_script(CLICK_JS, ref)
                elif kind == "type":
                    driver.execute_script(CLICK_JS, ref)
                    driver.switch_to.active_element.send_keys(arg)
                else:
                    driver.execute_script(SELECT_JS, ref, arg)
                if driver.execute_script(STATE_JS)["done"]:
                    break
        st = driver.execute_script(STATE_JS)
        return st["raw"] > 0, actions is None

    tasks = [t for t in a.tasks.split(",") if t]
    # Warm-up (untimed): one generation and one page.
    episode(tasks[0], 50_000, 0.0)
    res = {"baseline": [], "steered": []}
    t0 = time.time()
    for task in tasks:
        for seed in range(a.seeds):
            res["baseline"].append(episode(task, seed, 0.0))
            res["steered"].append(episode(task, seed, a.coeff))
    wall = time.time() - t0
    driver.quit()
    server.shutdown()
    pairs = len(tasks) * a.seeds
    rate = lambda xs, i: sum(x[i] for x in xs) / max(len(xs), 1)
    print(json.dumps({
        "pairs": pairs, "eval_s": wall, "pairs_per_min": pairs / wall * 60.0, "threads": a.threads,
        "baseline_success": rate(res["baseline"], 0), "steered_success": rate(res["steered"], 0),
        "baseline_parse_failure": rate(res["baseline"], 1), "steered_parse_failure": rate(res["steered"], 1),
    }))


if __name__ == "__main__":
    main()
