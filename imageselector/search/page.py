"""The search page: one HTML file, one stylesheet, one script, served by web.py (no framework, no CDN).

Everything from the server is inserted with textContent, never innerHTML, so a listing title cannot
inject markup; the Content-Security-Policy allows only this origin.
"""

HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>imageselector search</title>
<link rel="stylesheet" href="/static/search.css">
<script src="/static/search.js" defer></script>
</head>
<body>
<header>
  <h1>Find listings that look like this</h1>
  <p id="summary" class="muted">Loading the indexes...</p>
</header>
<div id="warnings"></div>
<section id="query">
  <label id="drop" for="file" tabindex="0">
    <img id="preview" alt="" hidden>
    <span id="drop-text"><strong>Drop a photo here</strong> or click to choose one</span>
    <input id="file" type="file" accept="image/*">
  </label>
  <div id="controls">
    <form id="text-form" autocomplete="off">
      <input id="q" type="search" placeholder="...or describe it: &quot;blue ceramic mug&quot;" maxlength="500">
      <button id="search-text" type="submit">Search</button>
    </form>
    <div class="row">
      <label>Results <select id="k"><option>12</option><option selected>24</option><option>48</option></select></label>
      <span id="models"></span>
    </div>
    <p id="fusion" class="muted small"></p>
  </div>
</section>
<p id="message" role="alert" hidden></p>
<p id="meta" class="muted small"></p>
<main id="results"></main>
</body>
</html>
"""

CSS = """
:root { --fg:#1d1d1f; --muted:#6e6e73; --line:#e3e3e8; --accent:#f1641e; --bg:#fafafa; --err:#b3261e; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1280px; padding: 20px 24px 40px; font: 15px/1.4 -apple-system, BlinkMacSystemFont,
       "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: var(--fg); background: var(--bg); }
h1 { font-size: 22px; margin: 0 0 4px; }
.muted { color: var(--muted); } .small { font-size: 13px; }
header { margin-bottom: 12px; }
#warnings .warn { background: #fff4e5; border: 1px solid #f5c26b; color: #7a4b00; padding: 8px 12px;
                  border-radius: 8px; margin: 0 0 8px; }
#query { display: grid; grid-template-columns: 260px 1fr; gap: 20px; align-items: stretch; margin: 8px 0 12px; }
#drop { display: flex; flex-direction: column; align-items: center; justify-content: center; gap: 8px;
        min-height: 150px; border: 2px dashed #c7c7cc; border-radius: 12px; background: #fff; cursor: pointer;
        text-align: center; padding: 12px; color: var(--muted); transition: border-color .15s, background .15s; }
#drop.over, #drop:focus { border-color: var(--accent); background: #fff8f4; outline: none; }
#drop input { display: none; }
#preview { max-width: 100%; max-height: 120px; border-radius: 6px; }
#controls { display: flex; flex-direction: column; gap: 10px; justify-content: center; }
#text-form { display: flex; gap: 8px; }
#q { flex: 1; font: inherit; padding: 10px 12px; border: 1px solid var(--line); border-radius: 8px; background: #fff; }
button { font: inherit; padding: 10px 18px; border: 0; border-radius: 8px; background: var(--accent); color: #fff;
         cursor: pointer; } button:disabled { opacity: .6; cursor: wait; }
.row { display: flex; flex-wrap: wrap; gap: 8px 16px; align-items: center; font-size: 14px; }
.row select { font: inherit; padding: 2px 4px; }
#models label { white-space: nowrap; }
#message { background: #fdecea; border: 1px solid #f1b0aa; color: var(--err); padding: 8px 12px; border-radius: 8px; }
#results { display: grid; grid-template-columns: repeat(auto-fill, minmax(190px, 1fr)); gap: 16px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 10px; overflow: hidden; display: flex;
        flex-direction: column; }
.card .thumb { aspect-ratio: 1 / 1; background: #fff; display: flex; align-items: center; justify-content: center;
               border-bottom: 1px solid var(--line); }
.card .thumb img { width: 100%; height: 100%; object-fit: contain; }
.card .thumb .none { color: var(--muted); font-size: 13px; }
.card .body { padding: 8px 10px 10px; display: flex; flex-direction: column; gap: 3px; flex: 1; }
.card .title { font-size: 14px; display: -webkit-box; -webkit-line-clamp: 2; -webkit-box-orient: vertical;
               overflow: hidden; min-height: 2.8em; }
.card .price { font-weight: 600; }
.card .shop { color: var(--muted); font-size: 13px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.card .foot { display: flex; justify-content: space-between; align-items: center; margin-top: auto; font-size: 12px;
              padding-top: 4px; }
.card a { color: var(--accent); text-decoration: none; } .card a:hover { text-decoration: underline; }
.badge { background: #f2f2f7; border-radius: 10px; padding: 1px 7px; color: var(--muted); }
@media (max-width: 700px) { #query { grid-template-columns: 1fr; } }
"""

JS = r"""
"use strict";
const $ = (id) => document.getElementById(id);
let STATUS = null;
let MAX_BYTES = 20 * 1024 * 1024;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function showMessage(text) {
  const m = $("message");
  m.textContent = text || "";
  m.hidden = !text;
}

function showWarnings(list) {
  const box = $("warnings");
  box.replaceChildren();
  for (const w of list || []) box.appendChild(el("p", "warn", w));
}

function chosenModels() {
  return Array.from(document.querySelectorAll("#models input:checked")).map((i) => i.value);
}

async function loadStatus() {
  try {
    const r = await fetch("/api/status");
    const data = await r.json();
    if (!r.ok) throw new Error(data.error || r.statusText);
    STATUS = data;
    MAX_BYTES = (data.limits.max_upload_mb || 20) * 1024 * 1024;
    const n = data.image_models.length;
    const counts = data.image_models.map((m) => `${m} ${data.indexes[m].count.toLocaleString()} images (${data.indexes[m].kind === "hnsw" ? "HNSW" : "exact"})`);
    $("summary").textContent = n
      ? `${n} image model${n > 1 ? "s" : ""}: ${counts.join(" · ")}`
      : "No image index yet: run image_search_v2/embed.py first.";
    const box = $("models");
    box.replaceChildren();
    for (const m of data.image_models) {
      const lab = el("label");
      const cb = el("input");
      cb.type = "checkbox"; cb.value = m; cb.checked = true;
      lab.append(cb, " " + m);
      box.appendChild(lab);
    }
    showFusion(data.fusion);
    showWarnings(data.warnings);
  } catch (e) {
    $("summary").textContent = "";
    showMessage("Cannot reach the search server: " + e.message);
  }
}

function showFusion(f) {
  if (!f) return;
  const w = Object.entries(f.weights || {}).map(([k, v]) => `${k} ${Number(v).toFixed(2)}`).join(", ");
  $("fusion").textContent = `Ranking: ${f.method}; weights (${f.weights_source}): ${w || "none"}`;
}

function busy(on) {
  $("search-text").disabled = on;
  document.body.style.cursor = on ? "progress" : "";
}

async function run(url, options) {
  busy(true);
  showMessage("");
  $("meta").textContent = "Searching...";
  try {
    const r = await fetch(url, options);
    let data;
    try { data = await r.json(); } catch (_) { throw new Error(`the server answered ${r.status} ${r.statusText}`); }
    if (!r.ok || data.error) throw new Error(data.error || r.statusText);
    render(data);
  } catch (e) {
    $("results").replaceChildren();
    $("meta").textContent = "";
    showMessage(e.message);
  } finally {
    busy(false);
  }
}

function params(extra) {
  const p = new URLSearchParams(extra || {});
  p.set("k", $("k").value);
  const models = chosenModels();
  if (STATUS && models.length && models.length < STATUS.image_models.length) p.set("models", models.join(","));
  return p;
}

function searchFile(file) {
  if (!file) return;
  if (file.size > MAX_BYTES) {
    showMessage(`The file is ${(file.size / 1e6).toFixed(1)} MB; the limit is ${(MAX_BYTES / 1048576).toFixed(0)} MB.`);
    return;
  }
  const prev = $("preview");
  if (file.type && file.type.startsWith("image/")) {
    prev.src = URL.createObjectURL(file);
    prev.hidden = false;
  } else {
    prev.hidden = true;
  }
  run("/api/search/image?" + params(), {
    method: "POST",
    headers: { "Content-Type": file.type || "application/octet-stream" },
    body: file,
  });
}

function price(r) {
  if (r.price === null || r.price === undefined) return "";
  const cur = r.currency || "";
  try {
    if (cur) return new Intl.NumberFormat(undefined, { style: "currency", currency: cur }).format(r.price);
  } catch (_) { /* unknown currency code */ }
  return `${Number(r.price).toFixed(2)} ${cur}`.trim();
}

function render(data) {
  const grid = $("results");
  grid.replaceChildren();
  showWarnings(data.warnings);
  if (data.fusion) showFusion(data.fusion);
  const q = data.query.type === "text" ? `"${data.query.text}"` : "the photo";
  $("meta").textContent = `${data.results.length} listings for ${q} from ${data.models.join(", ")} in ${data.timing_ms.total} ms`;
  if (!data.results.length) showMessage("No listings found.");
  for (const r of data.results) {
    const card = el("article", "card");
    card.dataset.listingId = r.listing_id;
    const thumb = el("a", "thumb");
    thumb.href = r.url; thumb.target = "_blank"; thumb.rel = "noopener noreferrer";
    if (r.image_url) {
      const img = el("img");
      img.loading = "lazy"; img.alt = r.title || `listing ${r.listing_id}`; img.src = r.image_url;
      img.onerror = () => thumb.replaceChildren(el("span", "none", "image not on this disk"));
      thumb.appendChild(img);
    } else {
      thumb.appendChild(el("span", "none", "no image"));
    }
    const body = el("div", "body");
    const title = el("div", "title", r.title || `Listing ${r.listing_id}`);
    title.title = r.title || "";
    body.appendChild(title);
    body.appendChild(el("div", "price", price(r)));
    body.appendChild(el("div", "shop", r.shop_name || (r.shop_id ? `shop ${r.shop_id}` : "")));
    const foot = el("div", "foot");
    const badge = el("span", "badge", `${r.n_models}/${data.models.length} models`);
    badge.title = Object.entries(r.scores).map(([m, s]) => `${m}: ${s.toFixed(3)} (rank ${r.ranks[m]})`).join("\n");
    const link = el("a", null, "Etsy ↗");
    link.href = r.url; link.target = "_blank"; link.rel = "noopener noreferrer";
    foot.append(badge, link);
    body.appendChild(foot);
    card.append(thumb, body);
    grid.appendChild(card);
  }
}

function setup() {
  const drop = $("drop");
  const file = $("file");
  file.addEventListener("change", () => searchFile(file.files[0]));
  for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  drop.addEventListener("drop", (e) => searchFile(e.dataTransfer.files[0]));
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); file.click(); } });
  $("text-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("q").value.trim();
    if (!text) { showMessage("Type something to search for."); return; }
    const p = params({ q: text });
    p.delete("models");  // text search uses the two CLIP models
    run("/api/search/text?" + p, {});
  });
  loadStatus();
}

document.addEventListener("DOMContentLoaded", setup);
"""
