#!/usr/bin/env node
// chainchat-admin: operator commands that speak the authenticated peer protocol.
import { register } from 'tsx/esm/api'

register()
const { main } = await import('../lib/main/admin.ts')
await main(process.argv.slice(2))
