// imgclf's page: plain JavaScript with no build step and no dependencies, served from the service itself.
//
// Rules this file keeps (docs/ui.md explains them):
// - Everything the service or the user supplies (labels, model names, file names, error messages) is
//   inserted with textContent, never as HTML. The page's Content-Security-Policy forbids inline
//   script anyway, so a label written as HTML could not run even if it were parsed.
// - API errors are shown as the API's own message (its {"error", "kind", "status"} object).
// - Uploads use XMLHttpRequest for its upload progress events; the answers of an older request are
//   dropped when a newer one has started (one counter, `generation`).
// - Previews are decoded in the browser (createImageBitmap) and drawn on a canvas: nothing is kept
//   and the page needs no blob: or data: image source.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const ui = {
    model: $("model"), modelInfo: $("model-info"), topK: $("top-k"), files: $("files"), drop: $("drop"),
    upload: $("upload"), progress: $("progress"), progressLabel: $("progress-label"),
    results: $("results"), status: $("status"), error: $("error"),
    single: $("single"), answeredBy: $("answered-by"), crop: $("crop"), cropCaption: $("crop-caption"),
    toggle: $("heatmap-toggle"), explainNote: $("explain-note"), predictions: $("predictions"),
    batch: $("batch"), batchBy: $("batch-by"), batchCaption: $("batch-caption"),
    batchBody: document.querySelector("#batch-table tbody"),
  };
  const CANVAS_WIDTH = 320;

  let models = []; // GET /models: [{name, version, labels, preprocessing, provider, default}]
  let chosen = null; // the File objects of the last pick, drop or paste
  let generation = 0; // bumped by every run: answers of an older run are ignored
  let view = null; // what the canvas shows: {bitmap, box, inputSize, heatmap}

  class ApiError extends Error {
    constructor(status, kind, message, retryAfter) {
      super(message);
      this.status = status;
      this.kind = kind;
      this.retryAfter = retryAfter;
    }
  }

  function parseJson(text) {
    try {
      return JSON.parse(text);
    } catch {
      return null;
    }
  }

  // The service's error object, or what to say when the answer is not one (a proxy's page, say).
  function apiError(status, body, raw, retryAfter) {
    if (body && typeof body.error === "string") {
      return new ApiError(status, typeof body.kind === "string" ? body.kind : "", body.error, retryAfter);
    }
    const snippet = (raw || "").trim().slice(0, 300);
    return new ApiError(status, "", snippet || `the service answered HTTP ${status}`, retryAfter);
  }

  // POST a form with XMLHttpRequest (fetch has no upload progress); resolves with the JSON answer.
  function post(path, form, progressText) {
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", path);
      xhr.setRequestHeader("Accept", "application/json");
      if (progressText) {
        xhr.upload.addEventListener("loadstart", () => showProgress(progressText, 0, 0));
        xhr.upload.addEventListener("progress", (e) => showProgress(progressText, e.loaded, e.lengthComputable ? e.total : 0));
        xhr.upload.addEventListener("load", () => showProgress(progressText, 1, 1));
      }
      xhr.addEventListener("load", () => {
        const body = parseJson(xhr.responseText);
        if (xhr.status >= 200 && xhr.status < 300 && body) {
          resolve(body);
        } else {
          reject(apiError(xhr.status, body, xhr.responseText, xhr.getResponseHeader("Retry-After")));
        }
      });
      xhr.addEventListener("error", () => reject(new ApiError(0, "network", "could not reach the service (network error); is it still running?")));
      xhr.addEventListener("abort", () => reject(new ApiError(0, "aborted", "the upload was cancelled")));
      xhr.send(form);
    });
  }

  function showProgress(label, loaded, total) {
    ui.upload.hidden = false;
    if (total > 0) {
      const percent = Math.min(100, Math.round((100 * loaded) / total));
      ui.progress.value = percent;
      ui.progressLabel.textContent = `${label}: ${percent} %${total > 1 ? ` of ${size(total)}` : ""}`;
    } else {
      ui.progress.removeAttribute("value"); // indeterminate until the browser knows the size
      ui.progressLabel.textContent = `${label}…`;
    }
  }

  function hideProgress() {
    ui.upload.hidden = true;
  }

  function size(bytes) {
    if (bytes >= 1024 * 1024) return `${(bytes / (1024 * 1024)).toFixed(1)} MB`;
    if (bytes >= 1024) return `${Math.round(bytes / 1024)} kB`;
    return `${bytes} bytes`;
  }

  function percent(score) {
    return `${(100 * score).toFixed(1)} %`;
  }

  function ms(value) {
    return `${Math.round(value)} ms`;
  }

  function node(tag, text, className) {
    const el = document.createElement(tag);
    if (text !== undefined) el.textContent = String(text);
    if (className) el.className = className;
    return el;
  }

  function setState(state) {
    ui.results.dataset.state = state;
  }

  function say(message) {
    ui.status.textContent = message;
  }

  function showError(err) {
    ui.error.replaceChildren();
    const head = err.status ? `Error ${err.status}${err.kind ? ` (${err.kind})` : ""}: ` : "Error: ";
    ui.error.append(node("strong", head), node("span", err.message, "message"));
    if (err.retryAfter) {
      ui.error.append(node("span", ` The service asks to try again in ${err.retryAfter} s.`, "retry-after"));
    }
    if (chosen && (err.status === 503 || err.status === 0)) {
      const again = node("button", "Try again");
      again.type = "button";
      again.addEventListener("click", run);
      ui.error.append(" ", again);
    }
    ui.error.hidden = false;
    if (err.kind === "unknown_model") loadModels(); // the service reloaded: offer what it serves now
  }

  function clearResults() {
    ui.error.hidden = true;
    ui.error.replaceChildren();
    ui.single.hidden = true;
    ui.batch.hidden = true;
    ui.predictions.replaceChildren();
    ui.batchBody.replaceChildren();
    ui.explainNote.textContent = "";
    delete ui.explainNote.dataset.state;
    if (view && view.bitmap) view.bitmap.close();
    view = null;
  }

  // --- models --------------------------------------------------------------------------------
  function modelValue(m) {
    // the name alone follows hot reloads; name:version only when one name is served twice (pinned)
    return models.filter((o) => o.name === m.name).length > 1 ? `${m.name}:${m.version}` : m.name;
  }

  function selectedModel() {
    return models.find((m) => modelValue(m) === ui.model.value) || null;
  }

  async function loadModels() {
    const keep = ui.model.value;
    let body;
    try {
      const response = await fetch("/models", { headers: { Accept: "application/json" } });
      const text = await response.text();
      body = parseJson(text);
      if (!response.ok || !body || !Array.isArray(body.models)) {
        throw apiError(response.status, body, text, response.headers.get("Retry-After"));
      }
    } catch (err) {
      ui.model.replaceChildren(node("option", "no model list"));
      ui.model.disabled = true;
      showError(err instanceof ApiError ? err : new ApiError(0, "network", String(err.message || err)));
      setState("error");
      return;
    }
    models = body.models;
    ui.model.replaceChildren();
    for (const m of models) {
      const option = node("option", `${m.name} (version ${m.version})`);
      option.value = modelValue(m);
      option.selected = keep ? option.value === keep : m.default;
      ui.model.append(option);
    }
    ui.model.disabled = models.length === 0;
    if (!models.length) {
      ui.model.append(node("option", "no model is served"));
      const why = Object.entries(body.not_loaded || {}).map(([k, v]) => `${k}: ${v}`).join("; ");
      showError(new ApiError(0, "", `the service serves no model${why ? ` (${why})` : ""}`));
    }
    describeModel();
  }

  function describeModel() {
    const m = selectedModel();
    if (!m) {
      ui.modelInfo.textContent = "";
      return;
    }
    const [h, w] = m.preprocessing.input_size;
    ui.modelInfo.textContent = `${m.labels} labels, input ${w}×${h} px, ${m.provider}`;
    ui.topK.max = String(m.labels);
  }

  // --- a run: one file -> /classify (+ /explain), several -> /classify_batch --------------------
  function take(fileList) {
    const files = Array.from(fileList || []);
    if (!files.length) return;
    chosen = files;
    run();
  }

  function fields(form) {
    const k = ui.topK.value.trim();
    form.append("top_k", k === "" ? "5" : k); // sent as typed: the service says what is wrong with it
    if (ui.model.value) form.append("model", ui.model.value);
    return form;
  }

  async function run() {
    if (!chosen || !chosen.length) return;
    const gen = ++generation;
    ui.results.dataset.run = String(gen); // tests wait for a new run, then for its state
    clearResults();
    setState("busy");
    if (chosen.length === 1) {
      await classifyOne(chosen[0], gen);
    } else {
      await classifyMany(chosen, gen);
    }
  }

  function fileName(file, i) {
    return file.name || `pasted image ${i + 1}`;
  }

  async function classifyOne(file, gen) {
    say(`Classifying ${fileName(file, 0)}…`);
    const form = fields(new FormData());
    form.append("image", file, fileName(file, 0));
    const started = performance.now();
    let answer;
    try {
      answer = await post("/classify", form, `Uploading ${fileName(file, 0)}`);
    } catch (err) {
      if (gen !== generation) return;
      hideProgress();
      showError(err);
      say(`The service did not classify ${fileName(file, 0)}.`);
      setState("error");
      return;
    }
    if (gen !== generation) return;
    hideProgress();
    const roundTrip = performance.now() - started;
    showPredictions(answer, roundTrip);
    setState("done");
    await showCrop(file, answer, gen);
  }

  function showPredictions(answer, roundTrip) {
    const timing = answer.timing_ms || {};
    const server = typeof timing.total === "number" ? `; the server took ${ms(timing.total)}` : "";
    const prep = typeof timing.preprocess === "number" ? `, ${ms(timing.preprocess)} of it preprocessing` : "";
    ui.answeredBy.replaceChildren(
      "Answered by ", node("strong", answer.model, "model-name"), " version ",
      node("strong", answer.version, "model-version"), ` in ${ms(roundTrip)}${server}${prep}.`,
    );
    for (const p of answer.predictions) {
      const item = node("li", undefined, "prediction");
      const row = node("div", undefined, "prediction-row");
      row.append(node("span", p.label, "label"), node("span", percent(p.score), "score"));
      const bar = node("div", undefined, "bar");
      bar.setAttribute("aria-hidden", "true");
      const fill = node("div", undefined, "fill");
      fill.style.width = `${Math.max(0, Math.min(1, p.score)) * 100}%`; // CSSOM: allowed by the policy
      bar.append(fill);
      item.append(row, bar);
      ui.predictions.append(item);
    }
    ui.single.hidden = false;
    const top = answer.predictions.slice(0, 3).map((p) => `${p.label} ${percent(p.score)}`).join(", ");
    say(`${answer.model} version ${answer.version}: ${top}.`);
  }

  // --- the crop the model saw, and the heatmap over it -------------------------------------------
  async function decode(file) {
    try {
      return await createImageBitmap(file, { imageOrientation: "from-image" });
    } catch {
      return null; // a format this browser cannot show (HEIC, say); the service may still read it
    }
  }

  // The crop box of service/preprocessing/tensor.py (shorter side to resize_size, centre crop),
  // in the upright image's pixels: shown until /explain answers with its own crop_box.
  function specBox(width, height, spec) {
    const [th, tw] = spec.input_size;
    const scale = spec.resize_size / Math.min(width, height);
    const newW = Math.max(tw, Math.round(width * scale));
    const newH = Math.max(th, Math.round(height * scale));
    const left = Math.round((newW - tw) / 2);
    const top = Math.round((newH - th) / 2);
    const sx = width / newW;
    const sy = height / newH;
    return [Math.max(0, left * sx), Math.max(0, top * sy), Math.min(width, (left + tw) * sx), Math.min(height, (top + th) * sy)];
  }

  async function showCrop(file, answer, gen) {
    const bitmap = await decode(file);
    if (gen !== generation) {
      if (bitmap) bitmap.close();
      return;
    }
    const m = models.find((o) => o.name === answer.model && o.version === answer.version) || selectedModel();
    const spec = m ? m.preprocessing : { input_size: [224, 224], resize_size: 256 };
    view = {
      bitmap,
      box: bitmap ? specBox(bitmap.width, bitmap.height, spec) : null,
      inputSize: spec.input_size,
      heatmap: null,
    };
    ui.toggle.disabled = true;
    draw();
    await explain(file, answer, gen);
  }

  async function explain(file, answer, gen) {
    ui.explainNote.dataset.state = "busy";
    ui.explainNote.textContent = "Computing the heatmap…";
    const form = new FormData();
    form.append("image", file, fileName(file, 0));
    form.append("model", `${answer.model}:${answer.version}`); // the version that answered
    form.append("format", "json");
    let result;
    try {
      result = await post("/explain", form, `Uploading ${fileName(file, 0)} for the heatmap`);
    } catch (err) {
      if (gen !== generation) return;
      hideProgress();
      ui.toggle.disabled = true;
      ui.explainNote.dataset.state = "unavailable";
      ui.explainNote.textContent = `No heatmap: ${err.message}`;
      return;
    }
    if (gen !== generation || !view) return;
    hideProgress();
    const heatmap = checkedHeatmap(result.heatmap);
    if (!heatmap) {
      ui.explainNote.dataset.state = "unavailable";
      ui.explainNote.textContent = "No heatmap: the service's answer had no usable heatmap.";
      return;
    }
    view.heatmap = heatmap;
    if (Array.isArray(result.crop_box) && result.crop_box.length === 4) view.box = result.crop_box.map(Number);
    view.inputSize = [heatmap.height, heatmap.width];
    ui.toggle.disabled = false;
    const target = result.target || {};
    const score = typeof target.score === "number" ? ` (${percent(target.score)})` : "";
    ui.explainNote.textContent = `Heatmap for “${target.label ?? "the top answer"}”${score}, method ${result.method ?? "unknown"}: red is where the model looked most.`;
    ui.explainNote.dataset.state = "done";
    draw();
  }

  // A heatmap the canvas can draw: {width, height, values} with height rows of width numbers.
  function checkedHeatmap(h) {
    if (!h || !Array.isArray(h.values) || !h.values.length) return null;
    const height = h.values.length;
    const width = Array.isArray(h.values[0]) ? h.values[0].length : 0;
    if (!width || h.values.some((row) => !Array.isArray(row) || row.length !== width)) return null;
    return { width, height, values: h.values };
  }

  // jet-like colours; transparent where the map is low so the photo stays visible.
  function heatCanvas(h) {
    const canvas = document.createElement("canvas");
    canvas.width = h.width;
    canvas.height = h.height;
    const ctx = canvas.getContext("2d");
    const image = ctx.createImageData(h.width, h.height);
    const clamp = (x) => Math.max(0, Math.min(1, x));
    for (let y = 0; y < h.height; y++) {
      for (let x = 0; x < h.width; x++) {
        const raw = Number(h.values[y][x]);
        const v = Number.isFinite(raw) ? clamp(raw) : 0;
        const i = 4 * (y * h.width + x);
        image.data[i] = 255 * clamp(1.5 - Math.abs(4 * v - 3));
        image.data[i + 1] = 255 * clamp(1.5 - Math.abs(4 * v - 2));
        image.data[i + 2] = 255 * clamp(1.5 - Math.abs(4 * v - 1));
        image.data[i + 3] = 255 * (0.1 + 0.55 * v);
      }
    }
    ctx.putImageData(image, 0, 0);
    return canvas;
  }

  function draw() {
    if (!view) return;
    const [ih, iw] = view.inputSize;
    const canvas = ui.crop;
    canvas.width = CANVAS_WIDTH;
    canvas.height = Math.max(1, Math.round((CANVAS_WIDTH * ih) / iw));
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#e8ebef";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    if (view.bitmap && view.box) {
      const [l, t, r, b] = view.box;
      ctx.imageSmoothingQuality = "high";
      ctx.drawImage(view.bitmap, l, t, Math.max(1, r - l), Math.max(1, b - t), 0, 0, canvas.width, canvas.height);
    } else {
      ctx.fillStyle = "#333";
      ctx.font = "14px sans-serif";
      ctx.fillText("This browser cannot show this format.", 12, 28);
    }
    const on = Boolean(view.heatmap && ui.toggle.checked);
    if (on) ctx.drawImage(heatCanvas(view.heatmap), 0, 0, canvas.width, canvas.height);
    canvas.dataset.heatmap = on ? "on" : "off";
    const what = view.bitmap ? "The crop the model saw" : "The photo (this browser cannot show its format)";
    canvas.setAttribute("aria-label", on ? `${what}, with the heatmap of where it looked` : what);
    ui.cropCaption.textContent = `${what}: ${iw}×${ih} px${on ? ", heatmap on" : ""}.`;
  }

  // --- several files: one table row each ----------------------------------------------------
  async function classifyMany(files, gen) {
    say(`Classifying ${files.length} files…`);
    const form = fields(new FormData());
    files.forEach((file, i) => form.append("images", file, fileName(file, i)));
    const started = performance.now();
    let answer;
    try {
      answer = await post("/classify_batch", form, `Uploading ${files.length} files`);
    } catch (err) {
      if (gen !== generation) return;
      hideProgress();
      showError(err);
      say(`The service did not classify the ${files.length} files.`);
      setState("error");
      return;
    }
    if (gen !== generation) return;
    hideProgress();
    const roundTrip = performance.now() - started;
    let ok = 0;
    for (const result of answer.results) {
      const row = node("tr");
      row.dataset.status = result.error ? "error" : "ok";
      row.append(node("td", result.index + 1), node("td", fileName(files[result.index] || {}, result.index), "file"));
      if (result.error) {
        const cell = node("td", undefined, "error-cell");
        cell.colSpan = 3;
        cell.append(node("strong", `Error ${result.error.status} (${result.error.kind}): `), node("span", result.error.message, "message"));
        row.append(cell);
      } else {
        ok += 1;
        const [top, ...rest] = result.predictions;
        row.append(node("td", top.label, "label"), node("td", percent(top.score), "score"),
          node("td", rest.map((p) => `${p.label} ${percent(p.score)}`).join(", "), "rest"));
      }
      ui.batchBody.append(row);
    }
    const bad = answer.results.length - ok;
    const total = answer.timing_ms && typeof answer.timing_ms.total === "number" ? `; the server took ${ms(answer.timing_ms.total)}` : "";
    ui.batchBy.replaceChildren(
      "Answered by ", node("strong", answer.model, "model-name"), " version ",
      node("strong", answer.version, "model-version"), ` in ${ms(roundTrip)}${total}.`,
    );
    ui.batchCaption.textContent = `${answer.results.length} files: ${ok} answered, ${bad} refused`;
    ui.batch.hidden = false;
    say(`${answer.results.length} files scored by ${answer.model} version ${answer.version}: ${ok} answered, ${bad} refused.`);
    setState("done");
  }

  // --- input: picker, drag and drop, paste --------------------------------------------------
  ui.files.addEventListener("change", () => {
    take(ui.files.files);
    ui.files.value = ""; // the same file can be chosen again
  });
  for (const type of ["dragenter", "dragover"]) {
    document.addEventListener(type, (e) => {
      if (!e.dataTransfer || !Array.from(e.dataTransfer.types || []).includes("Files")) return;
      e.preventDefault(); // a drop anywhere on the page is taken, never opened by the browser
      e.dataTransfer.dropEffect = "copy";
      ui.drop.classList.add("over");
    });
  }
  document.addEventListener("dragleave", (e) => {
    if (e.target === document.documentElement || e.target === ui.drop || !e.relatedTarget) ui.drop.classList.remove("over");
  });
  document.addEventListener("drop", (e) => {
    if (!e.dataTransfer || !e.dataTransfer.files.length) return;
    e.preventDefault();
    ui.drop.classList.remove("over");
    take(e.dataTransfer.files);
  });
  document.addEventListener("paste", (e) => {
    const files = Array.from((e.clipboardData && e.clipboardData.files) || []);
    if (!files.length) return; // text pasted into the number field stays text
    e.preventDefault();
    take(files);
  });
  ui.model.addEventListener("change", () => {
    describeModel();
    run();
  });
  ui.topK.addEventListener("change", run);
  ui.toggle.addEventListener("change", draw);

  setState("idle");
  loadModels();
})();
