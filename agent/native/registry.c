/* The sessions opening.c opened, by 4-tuple: open, and for linger_ns after
 * they close, because the witness's cross-check may ask about a short
 * connection after it has ended (as agent/proxy/sessions.py keeps Python's).
 * Its own lock: the relay threads add and close, the witness's thread asks.
 */
#include "native.h"

#include <string.h>

#define BUCKETS 16384

struct Registry {
    pthread_mutex_t mu;
    OpenSession *open[BUCKETS];    /* open and lingering, by key */
    OpenSession *closed, *closed_tail;  /* the lingering, oldest first */
    uint64_t linger_ns;
    RegistryCounts counts;
};

static OpenSession **bucket(Registry *r, const uint8_t key[TG_SESSION_KEY]) {
    return &r->open[tg_hash(key, TG_SESSION_KEY) % BUCKETS];
}

/* With r->mu held. */
static void expire(Registry *r, uint64_t now) {
    while (r->closed && r->closed->closed_ns + r->linger_ns < now) {
        OpenSession *s = r->closed;
        r->closed = s->later;
        if (!r->closed) r->closed_tail = NULL;
        OpenSession **pp = bucket(r, s->key);
        while (*pp != s) pp = &(*pp)->next;
        *pp = s->next;
        free(s);
    }
}

Registry *registry_new(uint64_t linger_ns) {
    Registry *r = calloc(1, sizeof *r);
    if (r == NULL) return NULL;
    pthread_mutex_init(&r->mu, NULL);
    r->linger_ns = linger_ns;
    return r;
}

void registry_free(Registry *r) {
    if (r == NULL) return;
    for (int i = 0; i < BUCKETS; i++) {
        while (r->open[i]) {
            OpenSession *s = r->open[i];
            r->open[i] = s->next;
            free(s);
        }
    }
    pthread_mutex_destroy(&r->mu);
    free(r);
}

void registry_add(Registry *r, OpenSession *s) {
    pthread_mutex_lock(&r->mu);
    OpenSession **b = bucket(r, s->key);
    s->next = *b;
    *b = s;
    r->counts.opened++;
    r->counts.open++;
    pthread_mutex_unlock(&r->mu);
}

void registry_closed(Registry *r, OpenSession *s, int upstream_failed, int close_failed) {
    uint64_t now = tg_clock_ns(CLOCK_MONOTONIC);
    pthread_mutex_lock(&r->mu);
    s->closed_ns = now ? now : 1;
    if (r->closed_tail) r->closed_tail->later = s; else r->closed = s;
    r->closed_tail = s;
    r->counts.open--;
    r->counts.upstream_failed += (uint64_t)upstream_failed;
    r->counts.close_failed += (uint64_t)close_failed;
    expire(r, now);
    pthread_mutex_unlock(&r->mu);
}

int registry_knows(Registry *r, const uint8_t key[TG_SESSION_KEY]) {
    int found = 0;
    lock_gil_free(&r->mu);
    expire(r, tg_clock_ns(CLOCK_MONOTONIC));
    for (OpenSession *s = *bucket(r, key); s && !found; s = s->next)
        found = memcmp(s->key, key, TG_SESSION_KEY) == 0;
    pthread_mutex_unlock(&r->mu);
    return found;
}

RegistryCounts registry_counts(Registry *r) {
    lock_gil_free(&r->mu);
    RegistryCounts c = r->counts;
    pthread_mutex_unlock(&r->mu);
    return c;
}
