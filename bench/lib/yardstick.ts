// The yardstick benches divide by: how fast this machine runs the one
// public-key operation a key release cannot avoid, crypto_box_seal
// (an ephemeral X25519 key pair, one X25519 shared key, XSalsa20-Poly1305).
// Measured in-process with no allocation in the loop, so it is a ceiling.
import sodium from 'sodium-native';

export interface Rate {
  ops: number;
  ms: number;
  perSec: number;
}

/** Seals 32-byte messages (one chunk key) to one X25519 public key for about `ms` milliseconds. */
export function sealRate(ms = 1000): Rate {
  const pk = Buffer.alloc(sodium.crypto_box_PUBLICKEYBYTES);
  const sk = sodium.sodium_malloc(sodium.crypto_box_SECRETKEYBYTES);
  sodium.crypto_box_keypair(pk, sk);
  const msg = Buffer.alloc(32, 0x5a);
  const out = Buffer.alloc(msg.length + sodium.crypto_box_SEALBYTES);
  try {
    for (let i = 0; i < 200; i++) sodium.crypto_box_seal(out, msg, pk); // warm up
    let ops = 0;
    const t0 = performance.now();
    let elapsed = 0;
    while (elapsed < ms) {
      for (let i = 0; i < 100; i++) sodium.crypto_box_seal(out, msg, pk);
      ops += 100;
      elapsed = performance.now() - t0;
    }
    return { ops, ms: elapsed, perSec: (ops * 1000) / elapsed };
  } finally {
    sodium.sodium_memzero(sk);
  }
}
