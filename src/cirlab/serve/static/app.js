// The search page: plain DOM, no framework and no build step; it talks only to this server's API.
const GALLERY_PAGE = 24;
const $ = (id) => document.getElementById(id);

const state = {
  reference: null, // {id, url} of a gallery image, or {file} of an upload
  query: null, // the reference and text of the results shown: the heat-maps explain those
  searches: 0, // counters that let a newer search or heat-map run drop an older one's late answers
  heatmapRuns: 0,
  galleryOffset: 0,
  previewUrl: null, // object URL of the uploaded reference, revoked when it is replaced
};

function element(tag, properties = {}, ...children) {
  const node = Object.assign(document.createElement(tag), properties);
  node.append(...children);
  return node;
}

function showMessage(text) {
  $("message").textContent = text;
  $("message").hidden = !text;
}

// The API answers errors with JSON {"detail": ...}; anything else (a crash, a proxy) is named by its status.
async function detailOf(response) {
  try {
    const { detail } = await response.json();
    if (detail) return typeof detail === "string" ? detail : JSON.stringify(detail);
  } catch {
    // not JSON
  }
  return `${response.status} ${response.statusText}`.trim();
}

async function api(path, options) {
  let response;
  try {
    response = await fetch(path, options);
  } catch {
    throw new Error("the server cannot be reached");
  }
  if (!response.ok) throw new Error(await detailOf(response));
  return response;
}

const thumbUrl = (url) => `${url}?thumb=1`;

function queryForm(query) {
  const form = new FormData();
  form.append("text", query.text);
  if (query.reference.file) form.append("image", query.reference.file);
  else form.append("image_id", query.reference.id);
  return form;
}

function setReference(reference) {
  state.reference = reference;
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = reference.file ? URL.createObjectURL(reference.file) : null;
  const name = reference.file ? reference.file.name : reference.id;
  const image = $("reference-image");
  image.src = state.previewUrl ?? thumbUrl(reference.url);
  image.alt = `Reference image ${name}`;
  image.hidden = false;
  $("reference-caption").textContent = `Reference: ${name}${reference.file ? " (uploaded)" : ""}`;
  if (!reference.file) $("upload").value = ""; // so that choosing the same file again is a change
}

function pick(image) {
  setReference({ id: image.id, url: image.url });
  showMessage("");
  $("text").focus(); // ready for the next change
  $("text").select();
}

async function search(event) {
  event.preventDefault();
  if (!state.reference) {
    showMessage("Choose a reference first: upload an image or pick one from the gallery.");
    return;
  }
  const query = { reference: state.reference, text: $("text").value };
  const form = queryForm(query);
  form.append("k", $("k").value);
  const run = ++state.searches;
  showMessage("");
  $("results-status").textContent = "Searching…";
  try {
    const { results } = await (await api("/api/search", { method: "POST", body: form })).json();
    if (run !== state.searches) return;
    state.query = query;
    renderResults(results);
  } catch (error) {
    if (run !== state.searches) return;
    showMessage(`Search failed: ${error.message}`);
    $("results-status").textContent = "The search failed.";
  }
}

function resultItem(hit) {
  const item = element("li", { className: "result" });
  item.dataset.id = hit.id;
  const button = element("button", { type: "button", className: "pick", title: "Use as the next reference" },
    element("span", { className: "frame" },
      element("img", { className: "thumb", src: thumbUrl(hit.url), alt: hit.id }),
      element("img", { className: "overlay", alt: `Heat-map over ${hit.id}`, hidden: true })));
  button.setAttribute("aria-label", `Use ${hit.id} as the next reference`);
  button.addEventListener("click", () => pick(hit));
  item.append(button,
    element("p", { className: "caption" }, element("span", { className: "id", textContent: hit.id }),
      element("span", { className: "score", title: "score", textContent: hit.score.toFixed(3) })),
    element("p", { className: "note", hidden: true }));
  return item;
}

function renderResults(results) {
  $("results").replaceChildren(...results.map(resultItem));
  $("results-status").textContent = results.length
    ? `${results.length} results for “${state.query.text}”. Click one to make it the next reference.`
    : "No results: the gallery is empty.";
  loadHeatmaps();
}

// Heat-maps are fetched one result at a time (the server explains one pair at a time anyway) and kept
// per method; a newer run (toggle, method or search) stops an older one.
async function loadHeatmaps() {
  const run = ++state.heatmapRuns;
  const on = $("heatmaps").checked;
  const method = $("method").value;
  for (const item of [...$("results").children]) {
    const overlay = item.querySelector(".overlay");
    if (on && overlay.dataset.method !== method) await explain(item, method, run);
    if (run !== state.heatmapRuns) return;
    overlay.hidden = !on || overlay.dataset.method !== method;
    if (!on) item.querySelector(".note").hidden = true;
  }
}

async function explain(item, method, run) {
  const overlay = item.querySelector(".overlay");
  const note = item.querySelector(".note");
  const form = queryForm(state.query);
  form.append("target_id", item.dataset.id);
  form.append("method", method);
  form.append("side", "target");
  try {
    const picture = await (await api("/api/explain", { method: "POST", body: form })).blob();
    if (run !== state.heatmapRuns) return;
    if (overlay.src) URL.revokeObjectURL(overlay.src);
    overlay.src = URL.createObjectURL(picture);
    overlay.dataset.method = method;
    note.hidden = true;
  } catch (error) {
    if (run !== state.heatmapRuns) return;
    note.textContent = `Heat-map unavailable: ${error.message}`;
    note.hidden = false;
  }
}

function galleryItem(image) {
  const button = element("button", { type: "button" },
    element("img", { src: thumbUrl(image.url), alt: image.id }),
    element("span", { className: "id", textContent: image.id }));
  button.setAttribute("aria-label", `Use ${image.id} as the reference`);
  button.addEventListener("click", () => pick(image));
  const item = element("li", {}, button);
  item.dataset.id = image.id;
  return item;
}

async function loadGallery(offset) {
  try {
    const page = await (await api(`/api/gallery?offset=${offset}&limit=${GALLERY_PAGE}`)).json();
    const end = page.offset + page.images.length;
    state.galleryOffset = page.offset;
    $("gallery").replaceChildren(...page.images.map(galleryItem));
    $("gallery-range").textContent = page.total ? `${page.offset + 1}–${end} of ${page.total}` : "The gallery is empty.";
    $("gallery-prev").disabled = page.offset === 0;
    $("gallery-next").disabled = end >= page.total;
  } catch (error) {
    showMessage(`The gallery could not be listed: ${error.message}`);
  }
}

$("search-form").addEventListener("submit", search);
$("upload").addEventListener("change", () => {
  const file = $("upload").files[0];
  if (file) setReference({ file });
});
$("heatmaps").addEventListener("change", loadHeatmaps);
$("method").addEventListener("change", loadHeatmaps);
$("gallery-prev").addEventListener("click", () => loadGallery(Math.max(0, state.galleryOffset - GALLERY_PAGE)));
$("gallery-next").addEventListener("click", () => loadGallery(state.galleryOffset + GALLERY_PAGE));
loadGallery(0);
