#!/usr/bin/env node
// The interactive chainchat client.
import { register } from 'tsx/esm/api'

register()
const { main } = await import('../lib/main/chat.ts')
await main(process.argv.slice(2))
