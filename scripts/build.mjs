// Compile lib/ ahead of time for the executables in bin/ (see bin/load.js): one ES module per
// executable in build/, with the modules they share split out and source maps back to lib/, and
// build/manifest.json, which names every source file that went in with a hash of its contents.
// Packages in node_modules stay outside, imported as usual.
//
//   node scripts/build.mjs      run by `npm install` (prepare) and `npm test`
//
// The new build is written beside the old one and swapped in by renames, so an executable
// starting meanwhile finds the old build, the new one, or none (and then loads lib/ through tsx).
// A build that fails (no esbuild, with dev dependencies left out) says so and exits 0: the
// executables work without it, only slower to start.

import fs from 'node:fs'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import { hashFile } from '../bin/load.js'

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..')
export const entries = ['server', 'chat', 'admin', 'status', 'start']

// Build into `outdir` (created, or replaced whole). Returns the manifest.
/** @returns {Promise<{ entries: Record<string, string>, sources: Record<string, string> }>} */
export async function buildInto (outdir) {
  const { build } = await import('esbuild')
  const tmp = `${outdir}.tmp-${process.pid}`
  fs.rmSync(tmp, { recursive: true, force: true })
  const result = await build({
    absWorkingDir: root,
    entryPoints: Object.fromEntries(entries.map(e => [e, `lib/main/${e}.ts`])),
    outdir: tmp,
    entryNames: '[name]',
    chunkNames: 'shared-[hash]',
    outExtension: { '.js': '.mjs' },
    bundle: true,
    splitting: true,
    format: 'esm',
    platform: 'node',
    target: 'node20',
    packages: 'external',
    sourcemap: true,
    metafile: true,
    logLevel: 'warning'
  })
  /** @type {Record<string, string>} */
  const sources = {}
  for (const file of Object.keys(result.metafile.inputs).sort()) sources[file] = hashFile(path.join(root, file))
  const manifest = { entries: Object.fromEntries(entries.map(e => [e, `${e}.mjs`])), sources }
  // The manifest goes in last: a build without one is never used.
  fs.writeFileSync(path.join(tmp, 'manifest.json'), JSON.stringify(manifest, null, 2) + '\n')
  const old = `${outdir}.old-${process.pid}`
  if (fs.existsSync(outdir)) fs.renameSync(outdir, old)
  fs.renameSync(tmp, outdir)
  fs.rmSync(old, { recursive: true, force: true })
  return manifest
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const started = Date.now()
  try {
    const manifest = await buildInto(path.join(root, 'build'))
    console.log(`build: lib/ compiled into build/ (${Object.keys(manifest.sources).length} source files, ${Date.now() - started} ms)`)
  } catch (e) {
    console.log(`build: not built (${String(e?.message ?? e).split('\n')[0]}); the executables will load lib/ through tsx`)
  }
}
