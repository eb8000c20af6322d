// A small seeded PRNG (mulberry32) and the few draws the fault suite needs. The same seed gives
// the same sequence on every machine, so a seed names a fault schedule and a workload plan.

export class Prng {
  private s: number

  constructor (seed: number) {
    this.s = seed >>> 0
  }

  // A float in [0, 1).
  next (): number {
    this.s = (this.s + 0x6d2b79f5) >>> 0
    let t = this.s
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }

  // An integer in [lo, hi], both included.
  int (lo: number, hi: number): number {
    return lo + Math.floor(this.next() * (hi - lo + 1))
  }

  chance (p: number): boolean {
    return this.next() < p
  }

  pick<T> (items: readonly T[]): T {
    if (items.length === 0) throw new Error('pick from an empty list')
    return items[Math.floor(this.next() * items.length)]
  }

  // A key of `weights` chosen in proportion to its weight (weights of 0 are never chosen).
  weighted<K extends string> (weights: Readonly<Record<K, number>>): K {
    const keys = Object.keys(weights) as K[]
    const total = keys.reduce((a, k) => a + Math.max(0, weights[k]), 0)
    let x = this.next() * total
    for (const k of keys) {
      x -= Math.max(0, weights[k])
      if (x < 0) return k
    }
    return keys.filter(k => weights[k] > 0).at(-1)!
  }

  // k distinct items, in random order.
  sample<T> (items: readonly T[], k: number): T[] {
    const pool = [...items]
    const out: T[] = []
    while (out.length < k && pool.length > 0) out.push(pool.splice(Math.floor(this.next() * pool.length), 1)[0])
    return out
  }

  // An independent generator derived from this seed and a label (per worker, per purpose).
  static derive (seed: number, label: string): Prng {
    let h = (seed ^ 0x9e3779b9) >>> 0
    for (let i = 0; i < label.length; i++) h = Math.imul(h ^ label.charCodeAt(i), 0x01000193) >>> 0
    return new Prng(h)
  }
}
