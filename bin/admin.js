#!/usr/bin/env node
// chainchat-admin: operator commands that speak the authenticated peer protocol.
import { load } from './load.js'

const { main } = await load('admin')
await main(process.argv.slice(2))
