// Live Avatar: a player for the MP4 while the Video Writer node is still writing it, and the
// run's health plot once it is done.
// Everything essential works without this file (API users never load it); it only adds views.
// The live stats (blocks done, fps, first frame, ETA) are the node's progress text, which
// ComfyUI shows by itself; this view does not repeat them.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const WRITER = "LiveAvatarVideoWriter";
// The writer's ui output naming the health plot (NAME.health.png).
const HEALTH = "liveavatar_health";
const EVENT = "liveavatar.status";
// Reload the growing file at most this often: the fragmented MP4 plays while it is written.
const RELOAD_MS = 4000;
const CAPTION_PX = 18;
// Height of the player before the first frame's size is known.
const DEFAULT_VIDEO_PX = 256;
// ComfyUI's widgets for a node's progress previews (still and animated).
const BLOCK_PREVIEW_WIDGETS = ["$$canvas-image-preview", "$$comfy_animation_preview"];

function fileUrl(file) {
  const params = new URLSearchParams({ filename: file.filename, subfolder: file.subfolder, type: file.type });
  return api.apiURL(`/view?${params.toString()}`);
}

function fitNode(node) {
  // Grow the node so the player fits below the widgets; shrinking is left to the user.
  const [, height] = node.computeSize();
  if (height > node.size[1]) node.setSize([node.size[0], height]);
  node.setDirtyCanvas(true, true);
}

function ensureView(node) {
  if (node.liveAvatarView) return node.liveAvatarView;
  const root = document.createElement("div");
  root.style.cssText = "display:flex;flex-direction:column;gap:2px;width:100%;font:12px sans-serif;";
  const caption = document.createElement("div");
  caption.style.cssText = `height:${CAPTION_PX}px;opacity:0.8;`;
  const video = document.createElement("video");
  video.controls = true;
  video.muted = true;
  video.playsInline = true;
  video.style.cssText = "width:100%;flex:1;min-height:0;background:#000;object-fit:contain;";
  root.append(caption, video);
  const widget = node.addDOMWidget("liveavatar_live", "liveavatar_live", root, { serialize: false, hideOnZoom: false });
  const view = { caption, video, widget, lastLoad: 0, url: null, pending: null, file: null };
  widget.computeLayoutSize = () => {
    const aspect = video.videoWidth ? video.videoHeight / video.videoWidth : 0;
    const videoPx = aspect ? Math.round((node.size[0] - 20) * aspect) : DEFAULT_VIDEO_PX;
    return { minHeight: CAPTION_PX + videoPx, minWidth: 0 };
  };
  video.addEventListener("loadedmetadata", () => fitNode(node));
  node.liveAvatarView = view;
  fitNode(node);
  return view;
}

function load(node, view) {
  view.pending = null;
  view.lastLoad = Date.now();
  const url = fileUrl(view.file);
  // Keep the viewer's place and play state across reloads of the growing file.
  const sameFile = view.url === url;
  const keep = sameFile ? view.video.currentTime : 0;
  const playing = sameFile && !view.video.paused;
  view.video.addEventListener("loadedmetadata", () => {
    view.video.currentTime = Math.min(keep, view.video.duration || 0);
    if (playing) view.video.play().catch(() => {});
  }, { once: true });
  view.video.src = `${url}&t=${view.lastLoad}`;
  view.url = url;
}

function showFile(node, view, file, frames) {
  view.file = file;
  view.caption.textContent = `writing ${file.filename}: ${frames} frames so far`;
  const wait = view.lastLoad + RELOAD_MS - Date.now();
  if (wait <= 0) load(node, view);
  // Throttled: load the newest state once the interval is over, so the last block is not missed.
  else if (!view.pending) view.pending = setTimeout(() => load(node, view), wait);
}

function remove(node, view) {
  clearTimeout(view.pending);
  view.video.pause();
  view.video.removeAttribute("src");
  view.video.load();  // let go of the connection to the file
  const index = node.widgets?.indexOf(view.widget) ?? -1;
  if (index >= 0) node.widgets.splice(index, 1);
  view.widget.onRemove?.();
  delete node.liveAvatarView;
  node.setDirtyCanvas(true, true);
}

function previewStore() {
  // The frontend's node-output store (Pinia) owns the progress previews from 1.2x on; only its
  // own revoke makes them give way (the app.nodePreviewImages copy is not read back since 1.3x).
  const pinia = document.querySelector("#vue-app")?.__vue_app__?.config?.globalProperties?.$pinia;
  return pinia?._s?.get("nodeOutput") ?? null;
}

function locatorId(node) {
  const graph = node.graph;
  return !graph || graph.isRootGraph !== false ? String(node.id) : `${graph.id}:${node.id}`;
}

function dropBlockPreview(node) {
  // ComfyUI shows a node's progress previews in place of its outputs, so the picture of the last
  // block would stand where its own player of the finished video belongs.
  const key = locatorId(node);
  const store = previewStore();
  if (store?.revokePreviewsByLocatorId) store.revokePreviewsByLocatorId(key);
  else {
    for (const url of app.nodePreviewImages?.[key] ?? []) URL.revokeObjectURL(url);
    delete app.nodePreviewImages?.[key];
  }
  node.imgs = undefined;
  // The frontend rebuilds a node's media view when its outputs object changes; forget the one it
  // has seen, so the next draw builds the player from the outputs rather than the preview.
  node.images = undefined;
  // The widgets that drew those previews would now draw nothing (and fail doing so).
  for (const name of BLOCK_PREVIEW_WIDGETS) {
    const index = node.widgets?.findIndex((w) => w.name === name) ?? -1;
    if (index >= 0) node.widgets.splice(index, 1)[0].onRemove?.();
  }
  node.setDirtyCanvas(true, true);
}

function showHealth(node, file) {
  // The plot on the node beside ComfyUI's player of the file; a later run of the node replaces it.
  let view = node.liveAvatarHealth;
  if (!view) {
    const img = document.createElement("img");
    img.style.cssText = "width:100%;object-fit:contain;";
    const widget = node.addDOMWidget(HEALTH, HEALTH, img, { serialize: false, hideOnZoom: false });
    widget.computeLayoutSize = () => {
      const aspect = img.naturalWidth ? img.naturalHeight / img.naturalWidth : 0;
      return { minHeight: aspect ? Math.round((node.size[0] - 20) * aspect) : 0, minWidth: 0 };
    };
    img.addEventListener("load", () => fitNode(node));
    view = node.liveAvatarHealth = { img, widget };
  }
  view.img.alt = view.img.title = `health of the run: ${file.filename}`;
  view.img.src = `${fileUrl(file)}&t=${Date.now()}`;
}

function writerNode(detail) {
  const node = app.graph?.getNodeById(Number(detail.node));
  return node?.comfyClass === WRITER ? node : null;
}

app.registerExtension({
  name: "liveavatar.writer",
  async setup() {
    api.addEventListener(EVENT, ({ detail }) => {
      const node = writerNode(detail);
      if (!node || !detail.file) return;
      showFile(node, ensureView(node), detail.file, detail.frames);
    });
    api.addEventListener("executed", ({ detail }) => {
      const node = writerNode(detail);
      if (!node) return;
      // ComfyUI's own player shows the finished file (the ui "images" + "animated" result).
      if (node.liveAvatarView) remove(node, node.liveAvatarView);
      dropBlockPreview(node);
      const plot = detail.output?.[HEALTH]?.[0];
      if (plot) showHealth(node, plot);
    });
  },
});
