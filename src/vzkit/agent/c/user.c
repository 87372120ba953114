/* vzkit-agent: who an exec'd process runs as. The EXEC request's "USER[:GROUP]" (names or
 * numeric ids) is resolved in the agent against the guest's /etc/passwd and /etc/group (musl's
 * getpwnam, getgrnam, getgrouplist), so an unknown name fails the request with an ERROR the host
 * can show; the child takes the credentials before exec (user_apply). */
#include "agent.h"

#include <errno.h>
#include <grp.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define ID_MAX 0xfffffffeul /* (uid_t)-1 means "unchanged" to the set*id calls */

/* A decimal id: digits only (no sign, no spaces), at most ID_MAX. */
static bool parse_id(const char *s, unsigned long *out)
{
    if (!*s || strspn(s, "0123456789") != strlen(s))
        return false;
    return parse_uint(s, ID_MAX, out) == 0;
}

static int fail(int *errnum, char *msg, size_t n, int err, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static int fail(int *errnum, char *msg, size_t n, int err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, n, fmt, ap);
    va_end(ap);
    *errnum = err;
    return -1;
}

static char *env_entry(const char *key, const char *value)
{
    size_t kl = strlen(key), vl = strlen(value);
    char *e = malloc(kl + vl + 2);
    if (e) {
        memcpy(e, key, kl);
        e[kl] = '=';
        memcpy(e + kl + 1, value, vl + 1);
    }
    return e;
}

/* The user's groups from /etc/group (its primary group first), as getgrouplist finds them. */
static int user_groups(const char *name, gid_t gid, struct exec_user *u)
{
    int n = 32;
    for (int tries = 0; tries < 8; tries++) {
        gid_t *list = malloc((size_t)n * sizeof *list);
        if (!list)
            return -1;
        int want = n;
        if (getgrouplist(name, gid, list, &want) >= 0) {
            u->groups = list;
            u->ngroups = (size_t)want;
            return 0;
        }
        free(list);
        if (want <= n) /* an error, not a short buffer */
            return -1;
        n = want;
    }
    return -1;
}

int user_resolve(const char *spec, struct exec_user *u, int *errnum, char *msg, size_t n)
{
    memset(u, 0, sizeof *u);
    const char *colon = strchr(spec, ':');
    size_t ulen = colon ? (size_t)(colon - spec) : strlen(spec);
    const char *group = colon ? colon + 1 : NULL;
    if (ulen == 0 || (group && (!*group || strchr(group, ':'))))
        return fail(errnum, msg, n, EINVAL,
                    "user \"%s\" is not USER or USER:GROUP (names or numeric ids)", spec);
    if (geteuid() != 0)
        return fail(errnum, msg, n, EPERM,
                    "the agent runs as uid %u, not root: it cannot run commands as user \"%s\"",
                    (unsigned)geteuid(), spec);
    char *name = strndup(spec, ulen);
    char *pw_name = NULL, *pw_dir = NULL;
    if (!name)
        return fail(errnum, msg, n, ENOMEM, "out of memory");
    unsigned long id;
    struct passwd *pw;
    errno = 0;
    if (parse_id(name, &id)) {
        pw = getpwuid((uid_t)id); /* none is fine: a bare uid (HOME=/, group 0 as runc does) */
        u->uid = (uid_t)id;
    } else {
        pw = getpwnam(name);
        if (!pw) {
            if (errno && errno != ENOENT)
                fail(errnum, msg, n, errno, "cannot look up user \"%s\" in the guest: %s", name,
                     strerror(errno));
            else
                fail(errnum, msg, n, ENOENT,
                     "no user \"%s\" in the guest's /etc/passwd: add it there, or give a "
                     "numeric uid",
                     name);
            free(name);
            return -1;
        }
        u->uid = pw->pw_uid;
    }
    u->gid = pw ? pw->pw_gid : 0;
    if (pw) { /* copied now: the next lookup may reuse musl's static entry */
        pw_name = strdup(pw->pw_name);
        pw_dir = strdup(pw->pw_dir && *pw->pw_dir ? pw->pw_dir : "/");
    } else {
        pw_name = strdup(name);
        pw_dir = strdup("/");
    }
    int rc = -1;
    if (!pw_name || !pw_dir) {
        fail(errnum, msg, n, ENOMEM, "out of memory");
        goto out;
    }
    if (group) {
        if (parse_id(group, &id)) {
            u->gid = (gid_t)id;
        } else {
            errno = 0;
            struct group *gr = getgrnam(group);
            if (!gr) {
                if (errno && errno != ENOENT)
                    fail(errnum, msg, n, errno, "cannot look up group \"%s\" in the guest: %s",
                         group, strerror(errno));
                else
                    fail(errnum, msg, n, ENOENT,
                         "no group \"%s\" in the guest's /etc/group: add it there, or give a "
                         "numeric gid",
                         group);
                goto out;
            }
            u->gid = gr->gr_gid;
        }
    }
    if (group || !pw) { /* USER:GROUP runs with just GROUP; a bare uid with its group only */
        u->groups = malloc(sizeof *u->groups);
        if (!u->groups) {
            fail(errnum, msg, n, ENOMEM, "out of memory");
            goto out;
        }
        u->groups[0] = u->gid;
        u->ngroups = 1;
    } else if (user_groups(pw_name, u->gid, u) < 0) {
        fail(errnum, msg, n, errno ? errno : EIO, "cannot list the groups of user \"%s\": %s",
             pw_name, strerror(errno ? errno : EIO));
        goto out;
    }
    u->env[0] = env_entry("HOME", pw_dir);
    u->env[1] = env_entry("USER", pw_name);
    u->env[2] = env_entry("LOGNAME", pw_name);
    if (!u->env[0] || !u->env[1] || !u->env[2]) {
        fail(errnum, msg, n, ENOMEM, "out of memory");
        goto out;
    }
    u->set = true;
    rc = 0;
out:
    if (rc < 0)
        user_free(u);
    free(name);
    free(pw_name);
    free(pw_dir);
    return rc;
}

void user_free(struct exec_user *u)
{
    free(u->groups);
    for (size_t i = 0; i < USER_ENV_N; i++)
        free(u->env[i]);
    memset(u, 0, sizeof *u);
}

int user_apply(const struct exec_user *u)
{
    if (!u->set)
        return 0;
    if (setgroups(u->ngroups, u->groups) < 0) {
        dprintf(2, "vzkit-agent: setgroups for uid %u: %s\n", (unsigned)u->uid, strerror(errno));
        return -1;
    }
    if (setgid(u->gid) < 0) {
        dprintf(2, "vzkit-agent: setgid %u: %s\n", (unsigned)u->gid, strerror(errno));
        return -1;
    }
    if (setuid(u->uid) < 0) {
        dprintf(2, "vzkit-agent: setuid %u: %s\n", (unsigned)u->uid, strerror(errno));
        return -1;
    }
    return 0;
}
