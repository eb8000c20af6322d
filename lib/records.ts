// The records of the replicated log. A record is what the primary decided, never what the
// client asked: index (i), epoch (e) and time (ts) are stamped once, by the primary, and every
// replica that applies the same records computes the same state (protocol.md, "Durability").

export interface RecordHeader {
  i: number // log index, strictly increasing by one
  e: number // epoch of the configuration that created the record
  ts: number // primary's clock, milliseconds, never decreasing along the log
  rk?: string // exactly-once key: the requester's account (or "") and the client's rid
}

export interface RegisterRecord extends RecordHeader {
  op: 'register'
  user: string
  salt: string // base64
  hash: string // base64 scrypt(password, salt)
}

export interface SendRecord extends RecordHeader {
  op: 'send'
  from: string
  to: string
  text: string
}

export interface ReadRecord extends RecordHeader {
  op: 'read'
  user: string
  limit: number
}

export interface DeleteMessagesRecord extends RecordHeader {
  op: 'delete_messages'
  user: string
  ids: number[]
}

export interface DeleteAccountRecord extends RecordHeader {
  op: 'delete_account'
  user: string
  created: number // index of the register record: deletes that incarnation of the name only
}

// Written by the server itself when a push has been handed to a live connection.
export interface MarkReadRecord extends RecordHeader {
  op: 'mark_read'
  user: string
  ids: number[]
}

// Written by a new primary to commit what it holds and to mark the start of its epoch.
export interface NoopRecord extends RecordHeader {
  op: 'noop'
}

// A send record as recovery reads it from the log (storage/framing.ts, decodeFrame's packSends):
// the header, with the names, the exactly-once key and the text left in the segment's buffer, in
// the record's payload at `start`, for the state to read from there (state.ts, ChatState.replay).
export interface PackedSendRecord extends Omit<SendRecord, 'text' | 'from' | 'to' | 'rk'> {
  packed: Buffer
  start: number
}

export type LogRecord = RegisterRecord | SendRecord | ReadRecord | DeleteMessagesRecord | DeleteAccountRecord | MarkReadRecord | NoopRecord

// What a caller hands to the log before the index, epoch and time are stamped.
export type RecordBody = LogRecord extends infer R ? R extends LogRecord ? Omit<R, 'i' | 'e' | 'ts'> : never : never
