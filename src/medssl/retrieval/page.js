// The page of `medssl serve`: pick or upload an image, show its nearest cases. No libraries, no network
// beyond this server. A search can also be opened by link: #key=KEY or #row=N.
"use strict";

const PAGE = 24;
const K = 12;
let start = 0;
let total = 0;

const $ = (id) => document.getElementById(id);

async function getJSON(url, options) {
  const response = await fetch(url, options);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function card(item, extra) {
  const div = document.createElement("div");
  div.className = "card";
  const img = document.createElement("img");
  img.src = item.thumbnail;
  img.alt = `${item.modality} image`;
  div.appendChild(img);
  const lines = [["", `${item.modality} · frame ${item.frame}`], ...extra];
  if (item.source) lines.unshift(["source", item.source]);  // the file, as the dataset names it
  lines.push(["key", item.key]);
  if (item.copies && item.copies.length) {
    lines.push(["copies", `same image in ${item.copies.length} more file(s): ` +
      item.copies.map((c) => c.source || c.key).join(", ")]);
  }
  for (const [cls, text] of lines) {
    const line = document.createElement("div");
    if (cls) line.className = cls;
    line.textContent = text;
    div.appendChild(line);
  }
  return div;
}

async function loadInfo() {
  const info = await getJSON("/api/info");
  $("info").textContent = `${info.rows.toLocaleString()} images indexed · encoder ${info.encoder.architecture} ` +
    `(${info.encoder.feature_dim} features) · ${info.library}`;
  $("limit").textContent = `PNG, JPEG, TIFF, DICOM or NIfTI, at most ${info.max_upload_mb} MB`;
  for (const [name, count] of Object.entries(info.modalities)) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = `${name} (${count})`;
    $("modality").appendChild(option);
  }
}

async function loadSamples() {
  const modality = encodeURIComponent($("modality").value);
  const page = await getJSON(`/api/samples?start=${start}&count=${PAGE}&modality=${modality}`);
  total = page.total;
  $("page").textContent = total ? ` ${start + 1}–${Math.min(start + PAGE, total)} of ${total} ` : " none ";
  const grid = $("samples");
  grid.replaceChildren(...page.rows.map((item) => {
    const div = card(item, []);
    div.title = "find similar cases";
    div.addEventListener("click", () => search(`/api/search?row=${item.row}&k=${K}`));
    return div;
  }));
}

function showResults(result) {
  const query = card(result.query, [["distance", "query"]]);
  query.classList.add("query");
  const cards = result.neighbours.map((n) => {
    const shown = `distance ${n.distance.toFixed(4)}` + (n.is_query ? " (this image)" : "");
    const div = card(n, [["distance", shown]]);
    div.dataset.row = n.row;
    div.classList.add("neighbour");
    div.title = "search from this case";
    div.addEventListener("click", () => search(`/api/search?row=${n.row}&k=${K}`));
    return div;
  });
  $("neighbours").replaceChildren(query, ...cards);
  $("status").textContent = `${result.neighbours.length} nearest cases (cosine distance; 0 = same features)`;
}

async function search(url, options) {
  $("error").textContent = "";
  $("status").textContent = "searching…";
  try {
    showResults(await getJSON(url, options));
  } catch (e) {
    $("status").textContent = "";
    $("error").textContent = e.message;
  }
}

function searchFromLink() {
  const link = new URLSearchParams(location.hash.slice(1));
  if (link.has("key")) search(`/api/search?key=${encodeURIComponent(link.get("key"))}&k=${K}`);
  else if (link.has("row")) search(`/api/search?row=${encodeURIComponent(link.get("row"))}&k=${K}`);
}

$("modality").addEventListener("change", () => { start = 0; loadSamples(); });
$("prev").addEventListener("click", () => { if (start > 0) { start = Math.max(0, start - PAGE); loadSamples(); } });
$("next").addEventListener("click", () => { if (start + PAGE < total) { start += PAGE; loadSamples(); } });
$("by-key").addEventListener("click", () => {
  const key = $("key").value.trim();
  if (key) search(`/api/search?key=${encodeURIComponent(key)}&k=${K}`);
});
$("file").addEventListener("change", () => {
  const file = $("file").files[0];
  if (file) search(`/api/search?k=${K}`, {method: "POST", body: file, headers: {"Content-Type": "application/octet-stream"}});
});
window.addEventListener("hashchange", searchFromLink);

loadInfo().then(loadSamples).then(searchFromLink).catch((e) => { $("error").textContent = e.message; });
