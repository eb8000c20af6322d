// A bare-bones group-commit server, for scale: `npm run bench -- --reference` drives it with
// the same clients as the real server. It does the least a durable server must do and nothing
// else: split lines, parse them, append each send to one file, fdatasync once per batch (in the
// thread pool, one at a time, the next batch gathering meanwhile), and reply. It keeps no
// state, checks nothing, and answers register, login and everything else but send with ok.
// It is not a chainchat server and is never part of `npm test`.
//
//   node --import tsx bench/reference-server.ts --port <n> --data <dir>

import fs from 'node:fs'
import net from 'node:net'
import path from 'node:path'
import { parseArgs } from 'node:util'

const { values } = parseArgs({ options: { port: { type: 'string' }, host: { type: 'string' }, data: { type: 'string' } } })
const dir = values.data ?? '.'
fs.mkdirSync(dir, { recursive: true })
const fd = fs.openSync(path.join(dir, 'reference.log'), 'a')

interface Waiting { socket: net.Socket, reply: string }
let records: string[] = []
let waiting: Waiting[] = []
let syncing = false
let scheduled = false
let index = 0

function flush (): void {
  scheduled = false
  if (syncing || records.length === 0) return
  const replies = waiting
  fs.writeSync(fd, records.join(''))
  records = []
  waiting = []
  syncing = true
  fs.fdatasync(fd, (err) => {
    syncing = false
    if (err) throw err
    for (const w of replies) w.socket.write(w.reply)
    flush()
  })
}

function onLine (socket: net.Socket, line: string): void {
  const r = JSON.parse(line) as Record<string, unknown>
  if (r.op !== 'send') {
    socket.write(JSON.stringify({ ok: true, id: r.id, ...(r.op === 'login' ? { user: r.user, unread: 0 } : {}) }) + '\n')
    return
  }
  const message = { id: ++index, from: 'sender', to: r.to, text: r.text, ts: Date.now() }
  records.push(JSON.stringify({ i: index, op: 'send', to: r.to, text: r.text, rid: r.rid, ts: message.ts }) + '\n')
  waiting.push({ socket, reply: JSON.stringify({ ok: true, id: r.id, message, delivered: false }) + '\n' })
  if (!syncing && !scheduled) {
    scheduled = true
    setImmediate(flush)
  }
}

const server = net.createServer({ noDelay: true }, socket => {
  let rest = ''
  socket.setEncoding('utf8')
  socket.on('data', (data: string) => {
    const lines = (rest + data).split('\n')
    rest = lines.pop()!
    for (const line of lines) if (line !== '') onLine(socket, line)
  })
  socket.on('error', () => {})
})
server.listen(Number(values.port ?? 0), values.host ?? '127.0.0.1', () => {
  const a = server.address() as net.AddressInfo
  process.stdout.write(JSON.stringify({ event: 'listening', host: a.address, port: a.port }) + '\n')
})
process.on('SIGTERM', () => process.exit(0))
