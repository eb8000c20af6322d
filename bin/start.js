#!/usr/bin/env node
// `npm start`: a local three-server chain for development (lib/main/start.ts).
import { register } from 'tsx/esm/api'

register()
const { main } = await import('../lib/main/start.ts')
await main(process.argv.slice(2))
