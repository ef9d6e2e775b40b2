// The OpenID provider the sign-in tests log in to: panva's oidc-provider (a certified
// OpenID Connect implementation) with its built-in login form (devInteractions).
//
//   node tests/oidc/provider.mjs CONFIG.json
//
// CONFIG.json: {"issuer": "http://127.0.0.1:PORT", "port": PORT,
//               "clients": [oidc-provider client metadata, ...],
//               "users": {"<login>": {"name": ..., "email": ..., "groups": [...]}, ...}}
//
// The login form accepts any password for a login listed in "users". Signing keys are
// made fresh for each run. PKCE is required of every client, as the node always sends it.
// "ready" on stdout once it listens.
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';

import Provider from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));

const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: 'test-rs256', use: 'sig', alg: 'RS256' };

const provider = new Provider(config.issuer, {
  clients: config.clients,
  jwks: { keys: [signingKey] },
  cookies: { keys: [randomBytes(32).toString('hex')] },
  pkce: { required: () => true },
  features: { devInteractions: { enabled: true } },
  scopes: ['openid', 'offline_access', 'profile', 'email', 'groups'],
  claims: {
    openid: ['sub'],
    profile: ['name', 'preferred_username'],
    email: ['email', 'email_verified'],
    groups: ['groups'],
  },
  async findAccount(ctx, id) {
    const user = config.users[id];
    if (!user) return undefined;
    return {
      accountId: id,
      async claims() {
        return {
          sub: id,
          preferred_username: id,
          name: user.name,
          email: user.email,
          email_verified: true,
          groups: user.groups,
        };
      },
    };
  },
});

const server = provider.listen(config.port, '127.0.0.1', () => {
  process.stdout.write('ready\n');
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
