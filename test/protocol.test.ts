import t from 'tap'
import { parseRequest, RequestParseError, encodeReply, encodeError, encodeEvent, intField, stringField } from '../lib/protocol.ts'
import { commands, isOp } from '../lib/commands.ts'
import { ChatError, errors } from '../lib/errors.ts'
import type { Reply } from '../lib/state.ts'

function parseError (line: string): RequestParseError {
  try {
    parseRequest(line)
  } catch (e) {
    if (e instanceof RequestParseError) return e
    throw e
  }
  throw new Error(`${line} parsed`)
}

t.test('parseRequest: op, id and fields', async t => {
  const r = parseRequest('{"op":"send","id":7,"to":"bob","text":"hi"}')
  t.equal(r.op, 'send')
  t.equal(r.id, 7)
  t.same({ ...r.fields }, { to: 'bob', text: 'hi' })
  t.equal(parseRequest('{"op":"ping","id":"x"}').id, 'x')
  t.equal(parseRequest('{"op":"ping"}').id, undefined)
})

t.test('parseRequest: the bad-input table', async t => {
  const table: Array<[string, string, unknown]> = [
    ['{not json', 'BAD_JSON', undefined],
    ['[1,2]', 'BAD_REQUEST', undefined],
    ['null', 'BAD_REQUEST', undefined],
    ['"op"', 'BAD_REQUEST', undefined],
    ['{"id":3}', 'BAD_REQUEST', 3],
    ['{"op":5,"id":"a"}', 'BAD_REQUEST', 'a'],
    ['{"op":"ping","id":{"x":1}}', 'BAD_REQUEST', undefined],
    [`{"op":"ping","id":"${'x'.repeat(200)}"}`, 'BAD_REQUEST', undefined]
  ]
  for (const [line, code, id] of table) {
    const e = parseError(line)
    t.equal(e.error.code, code, line.slice(0, 40))
    t.equal(e.id, id, `id of ${line.slice(0, 40)}`)
  }
})

t.test('__proto__ stays an inert field', async t => {
  const r = parseRequest('{"op":"register","__proto__":{"ok":true,"polluted":1},"user":"u"}')
  t.equal(Object.getPrototypeOf(r.fields), null)
  t.equal(({} as Record<string, unknown>).polluted, undefined, 'Object.prototype untouched')
  t.same(Object.keys(r.fields).sort(), ['__proto__', 'user'])
})

t.test('encoders', async t => {
  t.equal(encodeReply(1, { ok: true, x: 2 }), '{"ok":true,"id":1,"x":2}\n')
  t.equal(encodeReply(undefined, { ok: true }), '{"ok":true}\n')
  t.equal(encodeReply('q', { ok: true }), '{"ok":true,"id":"q"}\n')
  t.equal(encodeReply(null, { ok: false, error: { code: 'AUTH_FAILED', message: 'm' } }), '{"ok":false,"id":null,"error":{"code":"AUTH_FAILED","message":"m"}}\n')
  // A reply made without ok first still comes out with ok, then the id, first.
  t.equal(encodeReply(7, { x: [1], ok: true } as unknown as Reply), '{"ok":true,"id":7,"x":[1]}\n')
  t.equal(encodeReply(undefined, { x: 1, ok: true } as unknown as Reply), '{"ok":true,"x":1}\n')
  t.equal(encodeReply(3, { ok: true, note: '{"ok":true' }), '{"ok":true,"id":3,"note":"{\\"ok\\":true"}\n', 'text that looks like the head is left alone')
  t.same(JSON.parse(encodeError('a', errors.noSuchUser('bob'))), { ok: false, id: 'a', error: { code: 'NO_SUCH_USER', message: 'no user named bob' } })
  t.same(JSON.parse(encodeError(undefined, errors.notPrimary('h:1'))).error, { primary: 'h:1', code: 'NOT_PRIMARY', message: 'this server is a backup; the primary is h:1' })
  t.equal(encodeEvent('account_deleted'), '{"event":"account_deleted"}\n')
})

t.test('field validators name the field', async t => {
  const f = Object.assign(Object.create(null), { n: 'x', s: 5, big: 5000 })
  t.throws(() => intField(f, 'n', { min: 0, max: 10, default: 1 }), { code: 'BAD_REQUEST', message: /^n: / })
  t.throws(() => intField(f, 'big', { min: 0, max: 10, default: 1 }), { message: /big: must be between 0 and 10/ })
  t.equal(intField(f, 'absent', { min: 0, max: 10, default: 4 }), 4)
  t.throws(() => stringField(f, 's', { maxBytes: 3 }), { message: 's: must be a string' })
  t.throws(() => stringField(f, 'absent', { maxBytes: 3 }), { message: 'absent: required' })
  t.equal(stringField(f, 'absent', { maxBytes: 3, optional: true }), undefined)
})

t.test('command table: validation per op', async t => {
  t.ok(isOp('send'))
  t.notOk(isOp('toString'), 'inherited names are not ops')
  t.notOk(isOp('frobnicate'))
  const bad: Array<[keyof typeof commands, Record<string, unknown>, string]> = [
    ['register', { user: 'bad name', password: 'p' }, 'user'],
    ['register', { user: 'x'.repeat(33), password: 'p' }, 'user'],
    ['register', { user: 'ok', password: '' }, 'password'],
    ['register', { user: 'ok', password: 'p', rid: 'r'.repeat(65) }, 'rid'],
    ['send', { to: 'bob', text: '' }, 'text'],
    ['send', { to: 'bob', text: 'é'.repeat(2049) }, 'text'],
    ['send', { to: 'bob' }, 'text'],
    ['read', { limit: 0 }, 'limit'],
    ['read', { limit: 1001 }, 'limit'],
    ['read', { limit: 1.5 }, 'limit'],
    ['users', { pattern: 'a[b]' }, 'pattern'],
    ['users', { limit: 1001 }, 'limit'],
    ['users', { offset: -1 }, 'offset'],
    ['history', { before: 'x' }, 'before'],
    ['delete_messages', { ids: 'x' }, 'ids'],
    ['delete_messages', { ids: [1, -2] }, 'ids'],
    ['delete_messages', { ids: new Array(1001).fill(1) }, 'ids'],
    ['delete_account', {}, 'password']
  ]
  for (const [op, fields, field] of bad) {
    const f = Object.assign(Object.create(null), fields)
    let err: unknown
    try { commands[op].parse(f) } catch (e) { err = e }
    t.ok(err instanceof ChatError && err.code === 'BAD_REQUEST' && err.extra.field === field, `${op} ${JSON.stringify(fields).slice(0, 50)} names ${field}`)
  }
  t.same(commands.users.parse(Object.create(null)), { pattern: '*', offset: 0, limit: 100 })
  t.same(commands.read.parse(Object.create(null)), { limit: 10, rid: undefined })
  t.equal(commands.send.parse(Object.assign(Object.create(null), { to: 'b', text: 'é'.repeat(2048) })).text.length, 2048, '4096 bytes is allowed')
  const mutating = Object.entries(commands).filter(([, c]) => c.mutates).map(([op]) => op).sort()
  t.same(mutating, ['delete_account', 'delete_messages', 'read', 'register', 'send'], 'exactly these ops are logged')
})
