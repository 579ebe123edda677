// Types for the parts of sodium-native that Lethe calls. sodium-native ships no
// declarations; every function here throws a TypeError on a wrong-sized buffer.
declare module 'sodium-native' {
  type Buf = Buffer | Uint8Array;
  const sodium: {
    crypto_aead_xchacha20poly1305_ietf_KEYBYTES: number;
    crypto_aead_xchacha20poly1305_ietf_NPUBBYTES: number;
    crypto_aead_xchacha20poly1305_ietf_ABYTES: number;
    crypto_box_PUBLICKEYBYTES: number;
    crypto_box_SECRETKEYBYTES: number;
    crypto_box_SEALBYTES: number;
    crypto_sign_PUBLICKEYBYTES: number;
    crypto_sign_SECRETKEYBYTES: number;
    crypto_sign_BYTES: number;
    crypto_generichash_BYTES: number;
    crypto_generichash_KEYBYTES_MIN: number;
    crypto_generichash_KEYBYTES: number;
    sodium_malloc(size: number): Buffer & { secure: boolean };
    sodium_memzero(buf: Buf): void;
    sodium_mprotect_noaccess(buf: Buf): void;
    sodium_mprotect_readonly(buf: Buf): void;
    sodium_mprotect_readwrite(buf: Buf): void;
    sodium_memcmp(a: Buf, b: Buf): boolean;
    randombytes_buf(buf: Buf): void;
    crypto_aead_xchacha20poly1305_ietf_encrypt(c: Buf, m: Buf, ad: Buf | null, nsec: null, npub: Buf, k: Buf): number;
    crypto_aead_xchacha20poly1305_ietf_decrypt(m: Buf, nsec: null, c: Buf, ad: Buf | null, npub: Buf, k: Buf): number;
    crypto_stream_xchacha20(c: Buf, n: Buf, k: Buf): void;
    crypto_stream_xchacha20_xor_ic(c: Buf, m: Buf, n: Buf, ic: number, k: Buf): void;
    crypto_onetimeauth_STATEBYTES: number;
    crypto_onetimeauth_KEYBYTES: number;
    crypto_onetimeauth_init(state: Buf, k: Buf): void;
    crypto_onetimeauth_update(state: Buf, m: Buf): void;
    crypto_onetimeauth_final(state: Buf, out: Buf): void;
    crypto_onetimeauth(out: Buf, m: Buf, k: Buf): void;
    crypto_box_keypair(pk: Buf, sk: Buf): void;
    crypto_box_seal(c: Buf, m: Buf, pk: Buf): void;
    crypto_box_seal_open(m: Buf, c: Buf, pk: Buf, sk: Buf): boolean;
    crypto_sign_keypair(pk: Buf, sk: Buf): void;
    crypto_sign_detached(sig: Buf, m: Buf, sk: Buf): void;
    crypto_sign_verify_detached(sig: Buf, m: Buf, pk: Buf): boolean;
    crypto_generichash(out: Buf, input: Buf, key?: Buf): void;
    crypto_pwhash_ALG_ARGON2ID13: number;
    crypto_pwhash_SALTBYTES: number;
    crypto_pwhash_OPSLIMIT_INTERACTIVE: number;
    crypto_pwhash_MEMLIMIT_INTERACTIVE: number;
    crypto_pwhash_OPSLIMIT_MODERATE: number;
    crypto_pwhash_MEMLIMIT_MODERATE: number;
    crypto_pwhash_OPSLIMIT_MIN: number;
    crypto_pwhash_MEMLIMIT_MIN: number;
    crypto_pwhash_STRBYTES: number;
    crypto_pwhash_str_async(out: Buf, passwd: Buf, opslimit: number, memlimit: number): Promise<void>;
    crypto_pwhash_str_verify_async(str: Buf, passwd: Buf): Promise<boolean>;
    crypto_pwhash_async(out: Buf, passwd: Buf, salt: Buf, opslimit: number, memlimit: number, alg: number, cb: (err: Error | null) => void): void;
  };
  export default sodium;
}
