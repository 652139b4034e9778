// Live Avatar: live stats and a player for the MP4 being written, on the Video Writer node.
// Everything essential works without this file (API users never load it); it only adds a view.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const WRITER = "LiveAvatarVideoWriter";
const EVENT = "liveavatar.status";
// Reload the growing file at most this often: the fragmented MP4 plays while it is written.
const RELOAD_MS = 4000;

function fileUrl(file) {
  const params = new URLSearchParams({ filename: file.filename, subfolder: file.subfolder, type: file.type });
  return api.apiURL(`/view?${params.toString()}`);
}

function formatStats(d) {
  const parts = [`block ${d.blocks_done}/${d.blocks_total ?? "?"}`, `${d.fps.toFixed(1)} fps`];
  if (d.first_frame_s != null) parts.push(`first frame ${d.first_frame_s.toFixed(1)} s`);
  if (d.eta_s != null) parts.push(`ETA ${Math.round(d.eta_s)} s`);
  return parts.join(" · ");
}

function ensureView(node) {
  if (node.liveAvatarView) return node.liveAvatarView;
  const root = document.createElement("div");
  root.style.cssText = "display:flex;flex-direction:column;gap:4px;width:100%;font:12px sans-serif;";
  const stats = document.createElement("div");
  stats.textContent = "idle";
  const video = document.createElement("video");
  video.controls = true;
  video.muted = true;
  video.style.cssText = "width:100%;max-height:360px;background:#000;display:none;";
  root.append(stats, video);
  node.addDOMWidget("liveavatar_live", "liveavatar_live", root, { serialize: false });
  node.liveAvatarView = { stats, video, lastLoad: 0, url: null };
  return node.liveAvatarView;
}

function showFile(view, file) {
  const now = Date.now();
  if (now - view.lastLoad < RELOAD_MS) return;
  const url = fileUrl(file);
  const keep = view.url === url ? view.video.currentTime : 0;
  view.video.src = `${url}&t=${now}`;
  view.video.style.display = "block";
  view.video.addEventListener("loadedmetadata", () => { view.video.currentTime = keep; }, { once: true });
  view.url = url;
  view.lastLoad = now;
}

app.registerExtension({
  name: "liveavatar.writer",
  async setup() {
    api.addEventListener(EVENT, ({ detail }) => {
      const node = app.graph?.getNodeById(Number(detail.node));
      if (!node || node.comfyClass !== WRITER) return;
      const view = ensureView(node);
      view.stats.textContent = formatStats(detail);
      if (detail.file) showFile(view, detail.file);
      node.setDirtyCanvas(true, false);
    });
    api.addEventListener("executed", ({ detail }) => {
      const node = app.graph?.getNodeById(Number(detail.node));
      const file = detail.output?.images?.[0];
      if (!node || node.comfyClass !== WRITER || !file) return;
      // ComfyUI's own player shows the finished file (the ui "images" + "animated" result).
      const view = ensureView(node);
      view.stats.textContent = `done: ${file.filename}`;
      view.video.pause();
      view.video.removeAttribute("src");
      view.video.style.display = "none";
      view.url = null;
    });
  },
});
