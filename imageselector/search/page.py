"""The search page: one HTML file, one stylesheet, one script, served by web.py (no framework, no CDN).

The page's state is its URL (`?q=`, `?upload=<sha256>`, `?similar=L:I`, `?copies=L:I|upload:<sha256>`,
`?listing=ID`, with `k`, `models`, `weights`): every action pushes a URL and renders from it, so the back
button, a reload and a shared link all show the same view. Everything from the server is inserted with
textContent (never innerHTML), so a listing title cannot inject markup; charts are SVG built with DOM
calls; the Content-Security-Policy allows only this origin.
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
  <h1><a href="/" id="home-link">Find listings that look like this</a></h1>
  <p id="summary" class="muted">Loading the indexes...</p>
</header>
<div id="warnings"></div>
<section id="query" aria-label="Query">
  <label id="drop" for="file" tabindex="0" role="button" aria-describedby="drop-text">
    <img id="preview" alt="the query photo" hidden>
    <span id="drop-text"><strong>Drop a photo here</strong> or press Enter to choose one</span>
    <input id="file" type="file" accept="image/*">
  </label>
  <div id="controls">
    <form id="text-form" autocomplete="off">
      <input id="q" type="search" aria-label="Describe the product"
             placeholder="...or describe it: &quot;blue ceramic mug&quot;" maxlength="500">
      <button id="search-text" type="submit">Search</button>
    </form>
    <div class="row">
      <label>Results <select id="k"><option>12</option><option selected>24</option><option>48</option></select></label>
      <label class="inline"><input type="checkbox" id="copies-mode"> Find copies of the photo</label>
    </div>
    <fieldset id="models"><legend>Models and weights</legend><span class="muted small">loading...</span></fieldset>
    <p id="fusion" class="muted small"></p>
  </div>
</section>
<p id="message" role="alert" hidden></p>
<p id="meta" class="muted small" aria-live="polite"></p>
<div id="layout">
  <main id="results" aria-label="Results"></main>
  <aside id="market" aria-label="Market view" hidden></aside>
</div>
<section id="detail" aria-label="Listing detail" hidden></section>
</body>
</html>
"""

CSS = """
:root { --fg:#1d1d1f; --muted:#6e6e73; --line:#e3e3e8; --accent:#c2410c; --bg:#fafafa; --err:#b3261e; }
* { box-sizing: border-box; }
[hidden] { display: none !important; }
body { margin: 0 auto; max-width: 1360px; padding: 16px 20px 40px; font: 15px/1.4 -apple-system, BlinkMacSystemFont,
       "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: var(--fg); background: var(--bg); }
h1 { font-size: 22px; margin: 0 0 4px; } h1 a { color: inherit; text-decoration: none; }
h2 { font-size: 18px; margin: 0 0 8px; } h3 { font-size: 15px; margin: 12px 0 6px; }
.muted { color: var(--muted); } .small { font-size: 13px; }
a { color: var(--accent); }
:focus-visible { outline: 3px solid #2563eb; outline-offset: 2px; }
#warnings .warn { background: #fff4e5; border: 1px solid #f5c26b; color: #7a4b00; padding: 6px 12px;
                  border-radius: 8px; margin: 0 0 8px; font-size: 14px; }
#query { display: grid; grid-template-columns: 220px 1fr; gap: 20px; align-items: stretch; margin: 8px 0 10px; }
#drop { display: flex; flex-direction: column; align-items: center; justify-content: center; gap: 8px;
        min-height: 140px; border: 2px dashed #c7c7cc; border-radius: 12px; background: #fff; cursor: pointer;
        text-align: center; padding: 10px; color: var(--muted); }
#drop.over, #drop:focus { border-color: var(--accent); background: #fff8f4; }
#drop input { display: none; }
#preview { max-width: 100%; max-height: 110px; border-radius: 6px; }
#controls { display: flex; flex-direction: column; gap: 8px; justify-content: center; }
#text-form { display: flex; gap: 8px; }
#q { flex: 1; font: inherit; padding: 9px 12px; border: 1px solid #c7c7cc; border-radius: 8px; background: #fff; }
button, .button { font: inherit; padding: 8px 16px; border: 0; border-radius: 8px; background: var(--accent); color: #fff;
         cursor: pointer; text-decoration: none; } button:disabled { opacity: .6; cursor: wait; }
button.small, .button.small { padding: 3px 9px; font-size: 13px; }
button.ghost { background: #f2f2f7; color: var(--fg); }
.row { display: flex; flex-wrap: wrap; gap: 8px 16px; align-items: center; font-size: 14px; }
#models { border: 1px solid var(--line); border-radius: 8px; padding: 6px 10px; display: flex; flex-wrap: wrap;
          gap: 4px 14px; font-size: 14px; margin: 0; }
#models legend { font-size: 13px; color: var(--muted); }
#models .model { white-space: nowrap; display: inline-flex; align-items: center; gap: 4px; }
#models input.weight { width: 4.2em; font: inherit; font-size: 13px; padding: 1px 3px; }
#message { background: #fdecea; border: 1px solid #f1b0aa; color: var(--err); padding: 8px 12px; border-radius: 8px; }
#layout { display: grid; grid-template-columns: 1fr 300px; gap: 18px; align-items: start; }
#layout.wide { grid-template-columns: 1fr; }
#results { display: grid; grid-template-columns: repeat(auto-fill, minmax(230px, 1fr)); gap: 14px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 10px; overflow: hidden; display: flex;
        flex-direction: column; }
.card .photos { display: grid; grid-template-columns: 2fr 1fr; gap: 2px; background: var(--line);
                border-bottom: 1px solid var(--line); }
.card .photos a, .card .photos figure { margin: 0; background: #fff; display: flex; flex-direction: column;
                align-items: center; justify-content: center; position: relative; min-width: 0; overflow: hidden; }
.card .photos a.matched { aspect-ratio: 1 / 1; }
.card .photos figure .muted { font-size: 11px; text-align: center; padding: 4px; }
.card .photos img { width: 100%; height: 100%; object-fit: contain; }
.card .photos .tag { position: absolute; left: 4px; bottom: 4px; background: rgba(0,0,0,.62); color: #fff;
                     font-size: 11px; padding: 0 5px; border-radius: 4px; }
.card .body { padding: 8px 10px 10px; display: flex; flex-direction: column; gap: 3px; flex: 1; }
.card .title { font-size: 14px; display: -webkit-box; -webkit-line-clamp: 2; -webkit-box-orient: vertical;
               overflow: hidden; min-height: 2.8em; color: var(--fg); }
.card .price { font-weight: 600; }
.card .shop { color: var(--muted); font-size: 13px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.card .score { font-size: 13px; }
.card ul.per-model { list-style: none; margin: 2px 0; padding: 0; font-size: 12px; color: #3a3a3c;
                     display: grid; grid-template-columns: 1fr auto auto; gap: 0 8px; }
.card ul.per-model li { display: contents; }
.card .actions { display: flex; gap: 6px; flex-wrap: wrap; margin-top: auto; padding-top: 6px; font-size: 13px;
                 align-items: center; }
#market { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 12px 14px; font-size: 14px;
          position: sticky; top: 10px; }
#market table, #detail table { border-collapse: collapse; width: 100%; font-size: 13px; }
#market td, #market th, #detail td, #detail th { text-align: left; padding: 2px 4px; border-bottom: 1px solid var(--line); }
#market td.n, #detail td.n { text-align: right; font-variant-numeric: tabular-nums; }
.figure-row { display: flex; justify-content: space-between; gap: 8px; }
#detail { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 14px 16px; }
#detail .gallery { display: flex; gap: 8px; flex-wrap: wrap; margin: 8px 0; }
#detail .gallery a { display: block; width: 150px; height: 150px; border: 1px solid var(--line); border-radius: 8px;
                     overflow: hidden; background: #fff; }
#detail .gallery img { width: 100%; height: 100%; object-fit: contain; }
#detail .cols { display: grid; grid-template-columns: 1fr 340px; gap: 20px; }
.charts { display: grid; grid-template-columns: repeat(2, minmax(220px, 1fr)); gap: 10px; }
.chart { border: 1px solid var(--line); border-radius: 8px; padding: 6px 8px; margin: 0; }
.chart svg { width: 100%; height: 120px; display: block; }
@media (max-width: 900px) { #layout, #detail .cols { grid-template-columns: 1fr; } #query { grid-template-columns: 1fr; } }
"""

JS = r"""
"use strict";
const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
let STATUS = null;
let MAX_BYTES = 20 * 1024 * 1024;
const CACHE = new Map();  // api url -> result: a POST's answer is shown without asking twice
const CLIP = ["clip_vitb32", "clip_vitl14"];
let SEQ = 0;  // the newest route(): answers to older ones are dropped

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  return e;
}
function showMessage(text) { const m = $("message"); m.textContent = text || ""; m.hidden = !text; }
function showWarnings(list) {
  const box = $("warnings"); box.replaceChildren();
  for (const w of list || []) box.appendChild(el("p", "warn", w));
}
function fmt(n, d) { return n === null || n === undefined ? "-" : Number(n).toLocaleString(undefined, { maximumFractionDigits: d ?? 0 }); }
function money(v, cur) {
  if (v === null || v === undefined) return "";
  try { if (cur) return new Intl.NumberFormat(undefined, { style: "currency", currency: cur }).format(v); } catch (_) { }
  return `${Number(v).toFixed(2)} ${cur || ""}`.trim();
}

// ------------------------------------------------------------------ models, weights and the URL
function modelBoxes() { return Array.from(document.querySelectorAll("#models input[type=checkbox]")); }
function chosenModels() { return modelBoxes().filter((b) => b.checked).map((b) => b.value); }
function weightsParam() {
  const parts = [];
  for (const inp of document.querySelectorAll("#models input.weight")) {
    const base = STATUS ? STATUS.fusion.weights[inp.dataset.model] : 1;
    if (inp.value !== "" && Number(inp.value) !== Number(base)) parts.push(`${inp.dataset.model}:${Number(inp.value)}`);
  }
  return parts.join(",");
}
function settingsParams(p, forText) {
  p.set("k", $("k").value);
  let models = chosenModels();
  if (forText) models = models.filter((m) => CLIP.includes(m));
  if (STATUS && models.length < STATUS.image_models.length) p.set("models", models.join(","));
  const w = weightsParam();
  if (w) p.set("weights", w);
  return p;
}
function restoreSettings(p) {
  if (p.get("k")) $("k").value = p.get("k");
  const models = p.get("models");
  for (const b of modelBoxes()) b.checked = !models || models.split(",").includes(b.value);
  const w = Object.fromEntries((p.get("weights") || "").split(",").filter(Boolean).map((x) => x.split(":")));
  for (const inp of document.querySelectorAll("#models input.weight")) {
    const base = STATUS ? STATUS.fusion.weights[inp.dataset.model] : 1;
    inp.value = w[inp.dataset.model] !== undefined ? w[inp.dataset.model] : base;
  }
}
function go(params) {
  const url = "/?" + params.toString();
  history.pushState(null, "", url);
  route();
}
function checkModels(forText) {
  const models = chosenModels();
  if (!models.length) { showMessage("Choose at least one model."); return false; }
  if (forText && !models.some((m) => CLIP.includes(m))) {
    showMessage("Text search needs a CLIP model: check clip_vitb32 or clip_vitl14."); return false;
  }
  return true;
}

async function loadStatus() {
  try {
    const r = await fetch("/api/status");
    const data = await r.json();
    if (!r.ok) throw new Error(data.error || r.statusText);
    STATUS = data;
    MAX_BYTES = (data.limits.max_upload_mb || 20) * 1024 * 1024;
    const n = data.image_models.length;
    const counts = data.image_models.map((m) => `${m} ${data.indexes[m].count.toLocaleString()} (${data.indexes[m].kind === "ivfpq" ? "compressed" : data.indexes[m].kind})`);
    $("summary").textContent = n ? `${n} image model${n > 1 ? "s" : ""}: ${counts.join(" · ")}` : "No image index yet: run image_search_v2/embed.py first.";
    const box = $("models");
    box.replaceChildren(el("legend", null, "Models and weights"));
    for (const m of data.image_models) {
      const span = el("span", "model");
      const lab = el("label");
      const cb = el("input"); cb.type = "checkbox"; cb.value = m; cb.checked = true; cb.id = `model-${m}`;
      lab.append(cb, " " + m);
      const w = el("input", "weight"); w.type = "number"; w.min = "0"; w.max = "100"; w.step = "0.1";
      w.dataset.model = m; w.value = data.fusion.weights[m] ?? 1; w.setAttribute("aria-label", `weight of ${m}`);
      span.append(lab, w);
      box.appendChild(span);
      cb.addEventListener("change", rerun);
      w.addEventListener("change", rerun);
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
function rerun() {  // a model box or weight changed: the same query again with the new settings
  const p = new URLSearchParams(location.search);
  if (p.has("listing") || ![...p.keys()].some((k) => ["q", "upload", "similar", "copies"].includes(k))) return;
  if (!checkModels(p.has("q"))) return;
  const keep = new URLSearchParams();
  for (const k of ["q", "upload", "similar", "copies"]) if (p.has(k)) keep.set(k, p.get(k));
  go(settingsParams(keep, p.has("q")));
}

// ------------------------------------------------------------------ actions
async function searchFile(file) {
  if (!file) return;
  if (file.size > MAX_BYTES) {
    showMessage(`The file is ${(file.size / 1e6).toFixed(1)} MB; the limit is ${(MAX_BYTES / 1048576).toFixed(0)} MB.`);
    return;
  }
  if (!checkModels(false)) return;
  const copies = $("copies-mode").checked;
  const p = settingsParams(new URLSearchParams(), false);
  busy(true); showMessage(""); $("meta").textContent = "Uploading...";
  try {
    const r = await fetch((copies ? "/api/copies?" : "/api/search/image?") + p, {
      method: "POST", headers: { "Content-Type": file.type || "application/octet-stream" }, body: file,
    });
    const data = await readJson(r);
    const digest = data.query.upload;
    const view = new URLSearchParams(p);
    if (copies) view.set("copies", "upload:" + digest); else view.set("upload", digest);
    view.sort();
    CACHE.set(apiFor(view), data);
    history.pushState(null, "", "/?" + view);
    route();
  } catch (e) {
    clearResults(); showMessage(e.message);
  } finally { busy(false); }
}
async function readJson(r) {
  let data;
  try { data = await r.json(); } catch (_) { throw new Error(`the server answered ${r.status} ${r.statusText}`); }
  if (!r.ok || data.error) throw new Error(data.error || r.statusText);
  return data;
}
function busy(on) { $("search-text").disabled = on; document.body.style.cursor = on ? "progress" : ""; }
function clearResults() {
  $("results").replaceChildren(); $("market").replaceChildren(); $("market").hidden = true; $("meta").textContent = "";
}

// which API answers the view in the URL
function apiFor(p) {
  const q = new URLSearchParams();
  for (const k of ["k", "models", "weights"]) if (p.has(k)) q.set(k, p.get(k));
  if (p.has("q")) { q.set("q", p.get("q")); q.sort(); return "/api/search/text?" + q; }
  if (p.has("upload")) { q.set("upload", p.get("upload")); q.sort(); return "/api/search/image?" + q; }
  if (p.has("similar")) { q.set("id", p.get("similar")); q.sort(); return "/api/search/similar?" + q; }
  if (p.has("copies")) {
    const c = p.get("copies");
    if (c.startsWith("upload:")) q.set("upload", c.slice(7)); else q.set("id", c);
    q.delete("weights"); q.sort();
    return "/api/copies?" + q;
  }
  return null;
}

async function route() {
  const my = ++SEQ;
  const p = new URLSearchParams(location.search);
  restoreSettings(p);
  showMessage("");
  const detail = $("detail");
  if (p.has("listing")) {
    $("layout").hidden = true; detail.hidden = false; $("meta").textContent = "";
    await showListing(p.get("listing"), my);
    return;
  }
  detail.hidden = true; detail.replaceChildren(); $("layout").hidden = false;
  if (p.has("q")) $("q").value = p.get("q");  // otherwise leave what the user may be typing
  $("copies-mode").checked = p.has("copies");
  const prev = $("preview");
  const up = p.get("upload") || ((p.get("copies") || "").startsWith("upload:") ? p.get("copies").slice(7) : null);
  const ref = p.get("similar") || (p.has("copies") && !up ? p.get("copies") : null);
  if (up) { prev.src = "/upload/" + up; prev.hidden = false; }
  else if (ref) { prev.src = "/image/" + ref.replace(":", "/"); prev.hidden = false; }
  else { prev.hidden = true; prev.removeAttribute("src"); }
  const sorted = new URLSearchParams(p); sorted.sort();
  const api = apiFor(sorted);
  if (!api) { clearResults(); return; }
  let data = CACHE.get(api);
  if (!data) {
    busy(true); $("meta").textContent = "Searching...";
    try { data = await readJson(await fetch(api)); CACHE.set(api, data); }
    catch (e) { if (my === SEQ) { clearResults(); showMessage(e.message); } return; }
    finally { busy(false); }
  }
  if (my === SEQ) render(data);
}

// ------------------------------------------------------------------ results
function link(href, text, cls) {
  const a = el("a", cls, text); a.href = href;
  if (href.startsWith("/?")) a.addEventListener("click", (e) => {
    if (e.ctrlKey || e.metaKey || e.shiftKey || e.button) return;
    e.preventDefault(); history.pushState(null, "", href); route(); window.scrollTo(0, 0);
  });
  return a;
}
function viewWith(extra) {
  const p = settingsParams(new URLSearchParams(), false);
  for (const [k, v] of Object.entries(extra)) p.set(k, v);
  return "/?" + p;
}

function render(data) {
  const grid = $("results");
  grid.replaceChildren();
  showWarnings(data.warnings);
  if (data.fusion) showFusion(data.fusion);
  const q = data.query;
  const copies = data.mode === "copies";
  const what = q.type === "text" ? `"${q.text}"` : q.listing_id ? `photo ${q.listing_id}:${q.image_id}` : "the photo";
  $("meta").textContent = copies
    ? `${data.results.length} listings reuse ${what} (copy test checked ${data.copy_test.checked} photos, threshold ${data.copy_test.threshold}) in ${data.timing_ms.total} ms`
    : `${data.results.length} listings for ${what} from ${data.models.join(", ")} in ${data.timing_ms.total} ms`;
  if (!data.results.length) showMessage(copies ? "No copies of this photo found." : "No listings found.");
  for (const r of data.results) grid.appendChild(card(r, data, copies));
  renderMarket(data.market);
}

function photo(src, alt, tagText) {
  const img = el("img"); img.loading = "lazy"; img.alt = alt; img.src = src;
  const wrap = [img];
  if (tagText) wrap.push(el("span", "tag", tagText));
  img.onerror = () => img.replaceWith(el("span", "muted small", "not on this disk"));
  return wrap;
}

function card(r, data, copies) {
  const c = el("article", "card");
  c.dataset.listingId = r.listing_id;
  c.dataset.matchedImageId = r.matched_image_id ?? "";
  const title = r.title || `Listing ${r.listing_id}`;
  const photos = el("div", "photos");
  const ref = `${r.listing_id}:${r.matched_image_id}`;
  const main = link(viewWith({ similar: ref }), null, "matched");
  main.setAttribute("aria-label", `More like this photo of ${title}`);
  main.title = "More like this photo";
  main.append(...photo(r.matched_image_url || r.image_url, `matched photo of ${title}`, copies ? "copy" : "matched"));
  const prim = el("figure", "primary");
  if (r.primary_image_url && r.primary_image_url !== r.matched_image_url) {
    prim.append(...photo(r.primary_image_url, `primary photo of ${title}`, "primary"));
  } else {
    prim.append(el("span", "muted small", "matched photo is the primary"));
  }
  photos.append(main, prim);
  const body = el("div", "body");
  const t = link(`/?listing=${r.listing_id}`, title, "title");
  t.setAttribute("aria-label", `Details of ${title}`);
  body.appendChild(t);
  body.appendChild(el("div", "price", money(r.price, r.currency)));
  body.appendChild(el("div", "shop", r.shop_name || (r.shop_id ? `shop ${r.shop_id}` : "")));
  if (copies) {
    body.appendChild(el("div", "score", `copy score ${Number(r.copy_score).toFixed(3)}`));
  } else {
    body.appendChild(el("div", "score", `fused score ${Number(r.fused_score).toFixed(4)} · ${r.n_models} of ${data.models.length} rankings`));
    const ul = el("ul", "per-model");
    ul.setAttribute("aria-label", "rank and score per model");
    for (const m of data.models) {
      const li = el("li");
      if (m in r.scores) li.append(el("span", null, m), el("span", null, `#${r.ranks[m]}`), el("span", null, Number(r.scores[m]).toFixed(3)));
      else li.append(el("span", "muted", m), el("span", "muted", "-"), el("span", "muted", "not found"));
      ul.appendChild(li);
    }
    body.appendChild(ul);
  }
  const act = el("div", "actions");
  act.append(
    link(viewWith({ similar: ref }), "More like this", "button small more"),
    link(viewWith({ copies: ref }), "Copies", "copies-link"),
  );
  const etsy = el("a", "etsy", "Etsy ↗"); etsy.href = r.url; etsy.target = "_blank"; etsy.rel = "noopener noreferrer";
  act.appendChild(etsy);
  body.appendChild(act);
  c.append(photos, body);
  return c;
}

function renderMarket(m) {
  const box = $("market");
  box.replaceChildren();
  if (!m || !m.listings) { box.hidden = true; return; }
  box.hidden = false;
  box.appendChild(el("h2", null, "Market view"));
  box.appendChild(el("p", "muted small", `over these ${m.listings} look-alikes, prices in ${m.currency}`));
  if (m.price) {
    const pr = el("div", "price-dist");
    pr.appendChild(el("div", "figure-row", null)).append(el("span", null, "median price"), el("strong", "median", money(m.price.median, m.currency)));
    pr.appendChild(el("div", "figure-row")).append(el("span", null, "quartiles"), el("span", "quartiles", `${money(m.price.q1, m.currency)} – ${money(m.price.q3, m.currency)}`));
    pr.appendChild(boxPlot(m.price, m.currency));
    if (m.unconverted) pr.appendChild(el("p", "muted small", `${m.unconverted} price(s) in a currency without a rate were left out`));
    box.appendChild(pr);
  } else {
    box.appendChild(el("p", "muted small", "no prices in the snapshots"));
  }
  const figs = el("div", "figs");
  figs.appendChild(el("div", "figure-row")).append(el("span", null, "favorers (total / median)"),
    el("span", "favorers", m.favorers.known ? `${fmt(m.favorers.total)} / ${fmt(m.favorers.median, 1)}` : "not reported"));
  figs.appendChild(el("div", "figure-row")).append(el("span", null, "views (total / median)"),
    el("span", "views", m.views.known ? `${fmt(m.views.total)} / ${fmt(m.views.median, 1)}` : "not reported"));
  box.appendChild(figs);
  box.appendChild(el("h3", null, `Shops holding most (${m.distinct_shops} shops)`));
  const t = el("table", "shops");
  const head = t.appendChild(el("tr"));
  for (const h of ["shop", "listings", "sold"]) head.appendChild(el("th", null, h));
  for (const s of m.shops) {
    const tr = t.appendChild(el("tr"));
    tr.append(el("td", null, s.shop_name || s.shop_id), el("td", "n", s.listings), el("td", "n", fmt(s.transaction_sold_count)));
  }
  box.appendChild(t);
  box.appendChild(el("h3", null, "Gaining favorers (what sells)"));
  if (!m.top_gainers.length) box.appendChild(el("p", "muted small", "no listing has two snapshots with a gain yet"));
  const ol = el("ol", "gainers");
  for (const g of m.top_gainers) {
    const li = ol.appendChild(el("li"));
    li.append(link(`/?listing=${g.listing_id}`, `listing ${g.listing_id}`), ` +${g.favorers_gained} in ${g.days} days`);
  }
  box.appendChild(ol);
}

function boxPlot(p, cur) {
  const W = 260, H = 34, pad = 8;
  const s = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `prices from ${money(p.min, cur)} to ${money(p.max, cur)}, median ${money(p.median, cur)}` });
  const span = (p.max - p.min) || 1;
  const x = (v) => pad + ((v - p.min) / span) * (W - 2 * pad);
  s.append(
    svg("line", { x1: x(p.min), x2: x(p.max), y1: H / 2, y2: H / 2, stroke: "#8e8e93" }),
    svg("rect", { x: x(p.q1), y: 6, width: Math.max(2, x(p.q3) - x(p.q1)), height: H - 12, fill: "#fde5d8", stroke: "#c2410c" }),
    svg("line", { x1: x(p.median), x2: x(p.median), y1: 4, y2: H - 4, stroke: "#c2410c", "stroke-width": 3 }),
  );
  return s;
}

// ------------------------------------------------------------------ listing detail
async function showListing(id, my) {
  const box = $("detail");
  box.replaceChildren(el("p", "muted", "Loading the listing..."));
  let d;
  try { d = await readJson(await fetch(`/api/listing/${encodeURIComponent(id)}`)); }
  catch (e) { if (my === SEQ) { box.replaceChildren(); showMessage(e.message); } return; }
  if (my !== SEQ) return;
  box.replaceChildren();
  const back = el("button", "ghost small", "← Back"); back.type = "button"; back.addEventListener("click", () => history.back());
  box.appendChild(back);
  box.appendChild(el("h2", "detail-title", d.title || `Listing ${d.listing_id}`));
  const line = el("p");
  line.append(el("strong", "detail-price", money(d.price, d.currency)));
  if (d.price_converted !== null && d.currency !== d.display_currency) line.append(` (${money(d.price_converted, d.display_currency)})`);
  line.append(" · ", el("span", "detail-shop", d.shop ? (d.shop.shop_name || `shop ${d.shop.shop_id}`) : "shop unknown"), " · ");
  const etsy = el("a", "detail-etsy", "Open on Etsy ↗"); etsy.href = d.url; etsy.target = "_blank"; etsy.rel = "noopener noreferrer";
  line.append(etsy);
  box.appendChild(line);
  const gal = el("div", "gallery");
  for (const ph of d.photos) {
    const a = link(viewWith({ similar: `${d.listing_id}:${ph.image_id}` }), null);
    a.setAttribute("aria-label", `More like photo ${ph.image_id}${ph.is_primary ? " (primary)" : ""}`);
    a.append(...photo(ph.url, `photo ${ph.image_id} of ${d.title || d.listing_id}`));
    gal.appendChild(a);
  }
  box.appendChild(gal);
  const cols = el("div", "cols");
  const left = el("div");
  left.appendChild(el("h3", null, `Over time (${d.snapshots.length} snapshot${d.snapshots.length === 1 ? "" : "s"})`));
  const charts = el("div", "charts");
  for (const [key, label] of [["price", `price (${d.currency || "?"})`], ["num_favorers", "favorers"], ["views", "views"], ["quantity", "quantity"]]) {
    charts.appendChild(chart(d.snapshots, key, label));
  }
  left.appendChild(charts);
  const right = el("div");
  right.appendChild(el("h3", null, "Shop"));
  if (d.shop) {
    const t = el("table", "shop-figures");
    const latest = d.shop.latest || {};
    const rows = [["name", d.shop.shop_name], ["country", d.shop.country], ["currency", d.shop.currency],
      ["active listings", fmt(latest.listing_active_count)], ["favorers", fmt(latest.num_favorers)],
      ["sold (all time)", fmt(latest.transaction_sold_count)], ["reviews", fmt(latest.review_count)],
      ["rating", latest.review_average != null ? Number(latest.review_average).toFixed(2) : "-"],
      ["snapshots", d.shop.snapshots.length]];
    for (const [k, v] of rows) { const tr = t.appendChild(el("tr")); tr.append(el("th", null, k), el("td", "n", v ?? "-")); }
    right.appendChild(t);
    if (d.shop.snapshots.length > 1) right.appendChild(chart(d.shop.snapshots, "transaction_sold_count", "shop sales"));
  } else right.appendChild(el("p", "muted", "no shop figures yet"));
  cols.append(left, right);
  box.appendChild(cols);
}

function chart(rows, key, label) {
  const fig = el("figure", "chart");
  fig.dataset.series = key;
  const pts = rows.filter((r) => r[key] !== null && r[key] !== undefined).map((r) => [r.t, Number(r[key])]);
  fig.appendChild(el("figcaption", "small", label));
  const W = 300, H = 120, L = 44, R = 8, T = 8, B = 20;
  const s = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
  if (!pts.length) {
    s.setAttribute("aria-label", `${label}: no data`);
    s.appendChild(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", fill: "#6e6e73", "font-size": 12 })).textContent = "no data";
    fig.appendChild(s); return fig;
  }
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  let x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (x1 === x0) { x0 -= 43200; x1 += 43200; }
  if (y1 === y0) { y0 -= 1; y1 += 1; }
  const X = (v) => L + ((v - x0) / (x1 - x0)) * (W - L - R), Y = (v) => H - B - ((v - y0) / (y1 - y0)) * (H - T - B);
  s.setAttribute("aria-label", `${label}: ${pts.length} points from ${fmt(ys[0], 2)} to ${fmt(ys[ys.length - 1], 2)}`);
  s.append(svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, stroke: "#c7c7cc" }), svg("line", { x1: L, x2: L, y1: T, y2: H - B, stroke: "#c7c7cc" }));
  for (const [v, y] of [[y1, T + 4], [y0, H - B]]) s.appendChild(svg("text", { x: L - 4, y, "text-anchor": "end", "font-size": 10, fill: "#6e6e73" })).textContent = fmt(v, 2);
  const day = (t) => new Date(t * 1000).toISOString().slice(0, 10);
  s.appendChild(svg("text", { x: L, y: H - 5, "font-size": 10, fill: "#6e6e73" })).textContent = day(x0);
  s.appendChild(svg("text", { x: W - R, y: H - 5, "font-size": 10, fill: "#6e6e73", "text-anchor": "end" })).textContent = day(x1);
  s.appendChild(svg("polyline", { points: pts.map((p) => `${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" "), fill: "none", stroke: "#c2410c", "stroke-width": 2 }));
  for (const p of pts) s.appendChild(svg("circle", { cx: X(p[0]).toFixed(1), cy: Y(p[1]).toFixed(1), r: 2.5, fill: "#c2410c", class: "pt" }));
  fig.appendChild(s);
  return fig;
}

// ------------------------------------------------------------------ setup
function setup() {
  const drop = $("drop"), file = $("file");
  file.addEventListener("change", () => { searchFile(file.files[0]); file.value = ""; });
  for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  drop.addEventListener("drop", (e) => searchFile(e.dataTransfer.files[0]));
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); file.click(); } });
  $("text-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("q").value.trim();
    if (!text) { showMessage("Type something to search for."); return; }
    if (!checkModels(true)) return;
    const p = new URLSearchParams({ q: text });
    go(settingsParams(p, true));
  });
  $("k").addEventListener("change", rerun);
  $("copies-mode").addEventListener("change", () => {
    const p = new URLSearchParams(location.search);
    const on = $("copies-mode").checked;
    const keep = settingsParams(new URLSearchParams(), false);
    if (on && (p.has("similar") || p.has("upload"))) {
      keep.set("copies", p.has("similar") ? p.get("similar") : "upload:" + p.get("upload")); go(keep);
    } else if (!on && p.has("copies")) {
      const c = p.get("copies");
      if (c.startsWith("upload:")) keep.set("upload", c.slice(7)); else keep.set("similar", c);
      go(keep);
    }
  });
  window.addEventListener("popstate", route);
  loadStatus().then(route);
}

document.addEventListener("DOMContentLoaded", setup);
"""
