// How the executables here load the TypeScript in lib/, in this very process.
//
// They run the build of lib/ in build/ (scripts/build.mjs, made by `npm install` and `npm test`)
// when every source file it was made from is unchanged, by the hashes in its manifest. Otherwise
// (an edit since the last build, no build at all, or CHAINCHAT_FROM_SOURCE=1) they load lib/
// through tsx's register API, which compiles each module as it is first imported, on a loader
// thread. From the build a server is ready in about 0.12 s; through tsx, in about 0.3 s.

import fs from 'node:fs'
import path from 'node:path'
import { createHash } from 'node:crypto'
import { fileURLToPath, pathToFileURL } from 'node:url'

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..')

export function hashFile (file) {
  return createHash('sha256').update(fs.readFileSync(file)).digest('hex')
}

// The module built for executable `name` in `buildDir`, if the build is current with the
// sources under `sourceRoot`; otherwise null.
export function builtEntry (buildDir, sourceRoot, name) {
  let manifest
  try {
    manifest = JSON.parse(fs.readFileSync(path.join(buildDir, 'manifest.json'), 'utf8'))
  } catch {
    return null
  }
  const entry = manifest?.entries?.[name]
  const sources = manifest?.sources
  if (typeof entry !== 'string' || sources === null || typeof sources !== 'object') return null
  for (const [file, hash] of Object.entries(sources)) {
    try {
      if (hashFile(path.join(sourceRoot, file)) !== hash) return null
    } catch {
      return null
    }
  }
  return path.join(buildDir, entry)
}

// The module of lib/main/<name>.ts, from the build when it is current.
export async function load (name) {
  const built = process.env.CHAINCHAT_FROM_SOURCE === '1' ? null : builtEntry(path.join(root, 'build'), root, name)
  if (built !== null) {
    process.setSourceMapsEnabled(true) // stack traces name lib/ files and lines
    return import(pathToFileURL(built).href)
  }
  const { register } = await import('tsx/esm/api')
  register()
  return import(`../lib/main/${name}.ts`)
}
