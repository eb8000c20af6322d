// The compiled build of lib/ the executables start from (scripts/build.mjs, bin/load.js): when it
// is used, that what it runs is a working server, and that the executables still run from lib/
// through tsx when it is not current.

import t from 'tap'
import fs from 'node:fs'
import path from 'node:path'
import { pathToFileURL } from 'node:url'
import { builtEntry, hashFile } from '../bin/load.js'
import { buildInto, entries } from '../scripts/build.mjs'
import { root, startServer, tmpDir, RawConn } from './helpers/spawn.ts'

t.test('builtEntry uses a build only while every source it lists is unchanged', async t => {
  const src = tmpDir(t, 'build-src')
  const out = path.join(src, 'out')
  fs.mkdirSync(path.join(src, 'lib'))
  fs.mkdirSync(out)
  fs.writeFileSync(path.join(src, 'lib/a.ts'), 'export const a = 1\n')
  fs.writeFileSync(path.join(src, 'lib/b.ts'), 'export const b = 2\n')
  const manifest = (sources: Record<string, string>): void => {
    fs.writeFileSync(path.join(out, 'manifest.json'), JSON.stringify({ entries: { server: 'server.mjs' }, sources }))
  }
  const both = { 'lib/a.ts': hashFile(path.join(src, 'lib/a.ts')), 'lib/b.ts': hashFile(path.join(src, 'lib/b.ts')) }

  t.equal(builtEntry(out, src, 'server'), null, 'no manifest: no build')
  fs.writeFileSync(path.join(out, 'manifest.json'), '{"entries":')
  t.equal(builtEntry(out, src, 'server'), null, 'a manifest cut short: no build')
  manifest(both)
  t.equal(builtEntry(out, src, 'server'), path.join(out, 'server.mjs'), 'every source unchanged: the build')
  t.equal(builtEntry(out, src, 'chat'), null, 'an executable the build does not have: no build')

  fs.writeFileSync(path.join(src, 'lib/b.ts'), 'export const b = 3\n')
  t.equal(builtEntry(out, src, 'server'), null, 'a source edited since: no build')
  fs.writeFileSync(path.join(src, 'lib/b.ts'), 'export const b = 2\n')
  t.equal(builtEntry(out, src, 'server'), path.join(out, 'server.mjs'), 'edited back: the build again')
  fs.rmSync(path.join(src, 'lib/a.ts'))
  t.equal(builtEntry(out, src, 'server'), null, 'a source removed: no build')

  fs.writeFileSync(path.join(out, 'manifest.json'), JSON.stringify({ entries: { server: 'server.mjs' }, sources: null }))
  t.equal(builtEntry(out, src, 'server'), null, 'a manifest without sources: no build')
})

t.test('a build of lib/ runs a working server, and names every source that went in', async t => {
  // Inside the project, so that the build's imports of packages find node_modules.
  const out = path.join(root, `build.test-${process.pid}`)
  t.teardown(() => fs.rmSync(out, { recursive: true, force: true }))
  const manifest = await buildInto(out)
  t.same(Object.keys(manifest.entries).sort(), [...entries].sort(), 'one module per executable')
  for (const file of ['lib/main/server.ts', 'lib/state.ts', 'lib/storage/log.ts', 'lib/replication/chain-node.ts']) {
    t.equal(manifest.sources[file], hashFile(path.join(root, file)), `${file} is listed with its hash`)
  }
  t.notOk(Object.keys(manifest.sources).some(f => f.includes('node_modules')), 'packages stay outside the build')
  t.equal(fs.readdirSync(root).filter(f => f.startsWith(`build.test-${process.pid}.`)).length, 0, 'nothing left beside it')
  const server = builtEntry(out, root, 'server')
  t.ok(server, 'the build is current with lib/')

  const data = tmpDir(t, 'build-run')
  const runner = 'const { main } = await import(process.argv[1]); await main(process.argv.slice(2))'
  const s = await startServer(t, { data, script: ['--input-type=module', '-e', runner, pathToFileURL(server!).href] })
  const c = await RawConn.open(s.port)
  t.same(await c.req({ op: 'register', id: 1, user: 'ann', password: 'pw' }), { ok: true, id: 1 })
  t.match(await c.req({ op: 'login', id: 2, user: 'ann', password: 'pw' }), { ok: true, user: 'ann', unread: 0 })
  t.match(await c.req({ op: 'send', id: 3, to: 'ann', text: 'hi' }), { ok: true, message: { from: 'ann', text: 'hi' } })
  c.close()
  t.equal(await s.stop(), 0, 'SIGTERM exits 0')
  t.match(s.stderr(), /"msg":"started".*"code":"build"/, 'it says it runs the build')
})

t.test('with CHAINCHAT_FROM_SOURCE=1 the server runs from lib/ through tsx', async t => {
  const data = tmpDir(t, 'build-source')
  const s = await startServer(t, { data, env: { CHAINCHAT_FROM_SOURCE: '1' } })
  const c = await RawConn.open(s.port)
  t.same(await c.req({ op: 'ping', id: 1 }), { ok: true, id: 1 })
  c.close()
  t.equal(await s.stop(), 0, 'SIGTERM exits 0')
  t.match(s.stderr(), /"msg":"started".*"code":"lib"/, 'it says it runs lib/')
})
