// What a server signs so that a device can trust the certificate it will serve next
// (docs/fleet.md, Key rotation): the context string, then the SHA-256 fingerprint.
export const TLS_PIN_CONTEXT = 'lethe-tls-pin-v1';
export const pinMessage = (fingerprint: string) => Buffer.from(`${TLS_PIN_CONTEXT}\n${fingerprint}`);
