#!/usr/bin/env node
// chainchat-status: every member of a chain at a glance, and whether the chain is healthy.
import { register } from 'tsx/esm/api'

register()
const { main } = await import('../lib/main/status.ts')
await main(process.argv.slice(2))
