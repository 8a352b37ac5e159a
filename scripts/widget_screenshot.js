// Screenshots of notebook 08's ipywidgets demos, as JupyterLab shows them (the README's figure).
//
//   npm install --prefix /tmp/chr @sparticuz/chromium puppeteer-core   # a headless Chromium from the npm registry
//   mkdir -p /tmp/jlsettings/@jupyterlab/docmanager-extension   # autosave off: the notebook stays without outputs
//   echo '{"autosave": false}' > /tmp/jlsettings/@jupyterlab/docmanager-extension/plugin.jupyterlab-settings
//   jupyter lab --no-browser --port 8890 --ServerApp.token='' --LabApp.expose_app_in_browser=True \
//       --LabApp.user_settings_dir=/tmp/jlsettings &
//   NODE_PATH=/tmp/chr/node_modules node scripts/widget_screenshot.js [URL] [OUT_DIR]
//
// Opens notebooks/08_sliders.ipynb, runs every cell (about 2 minutes on one CPU thread), moves the
// interpolation slider to t = 0.5 with the keyboard (each move regenerates the image in the kernel) and writes
// one PNG per widget demo plus the page around the first one.
const chromium = require("@sparticuz/chromium");
const puppeteer = require("puppeteer-core");

const base = process.argv[2] || "http://localhost:8890";
const outDir = process.argv[3] || "docs/figures";
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function kernelIdle(page) {
  // every code cell has run: no "[*]" prompt left and the kernel reports idle
  return page.evaluate(() => {
    const busy = [...document.querySelectorAll(".jp-InputPrompt")].some((p) => p.textContent.includes("*"));
    const status = window.jupyterapp.shell.currentWidget?.sessionContext?.session?.kernel?.status;
    return !busy && status === "idle";
  });
}

async function waitIdle(page, label, timeoutS) {
  for (let s = 0; s < timeoutS; s += 2) {
    await sleep(2000);
    if (await kernelIdle(page)) return;
  }
  throw new Error(`${label}: the kernel was still busy after ${timeoutS} s`);
}

(async () => {
  const browser = await puppeteer.launch({
    args: chromium.args,
    executablePath: await chromium.executablePath(),
    headless: true,
    defaultViewport: { width: 1200, height: 900 },
    protocolTimeout: 600000, // a busy machine answers slowly
  });
  const page = await browser.newPage();
  await page.goto(`${base}/lab/tree/notebooks/08_sliders.ipynb`, { waitUntil: "networkidle2", timeout: 120000 });
  await page.waitForFunction(() => window.jupyterapp && document.querySelector(".jp-Notebook .jp-Cell"), {
    timeout: 120000,
  });
  await page.waitForFunction(
    () => window.jupyterapp.shell.currentWidget?.sessionContext?.session?.kernel?.status === "idle",
    { timeout: 120000 },
  );
  await page.evaluate(async () => {
    const app = window.jupyterapp;
    if (!app.shell.leftCollapsed) await app.commands.execute("application:toggle-left-area");
    void app.commands.execute("notebook:run-all-cells"); // resolves when every cell has run: waited for below
  });
  await sleep(5000);
  await waitIdle(page, "run all", 900);

  const demos = await page.$$(".jp-OutputArea-output .widget-vbox");
  if (demos.length === 0) throw new Error("no widget demo in the outputs: is `widgets = True`?");
  // t = 0.5 on the interpolation demo (the second): 10 steps of 0.05, one regeneration each
  if (demos.length > 1) {
    const handle = await demos[1].$(".noUi-handle, .slider-handle, [role=slider]");
    if (handle) {
      await handle.focus();
      for (let i = 0; i < 10; i++) {
        await page.keyboard.press("ArrowRight");
        await sleep(300);
      }
      await sleep(3000);
      await waitIdle(page, "slider", 120);
    }
  }
  for (let i = 0; i < demos.length; i++) {
    await demos[i].evaluate((e) => e.scrollIntoView({ block: "center" }));
    await sleep(500);
    await demos[i].screenshot({ path: `${outDir}/widgets_08_demo${i + 1}.png` });
  }
  await demos[0].evaluate((e) => e.scrollIntoView({ block: "center" }));
  await sleep(500);
  await page.screenshot({ path: `${outDir}/widgets_08_lab.png` });
  console.log(`${demos.length} widget demos captured in ${outDir}`);
  await browser.close();
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
