# Sourced by bench/proxy.sh and bench/proxy_instructions.sh: the gateway configuration both
# measure — two rule chains (a subnet rule and a header rule) and every sensor on, no limits.
# Usage: proxy_allot_config LISTEN_PORT ADMIN_PORT BACKEND_ADDR > allot.toml
proxy_allot_config() {
  cat <<CONF
[listener]
address = "127.0.0.1:$1"
[admin]
address = "127.0.0.1:$2"
[gateway]
max_running = 100000
[[backend]]
name = "app"
addresses = ["$3"]
[[class]]
name = "premium"
backend = "app"
priority = 10
[[class]]
name = "basic"
backend = "app"
[[chain]]
name = "main"
default = { class = "basic" }
[[chain.rule]]
id = "office"
source = ["10.0.0.0/8"]
target = { class = "premium" }
[[chain.rule]]
id = "api-key"
header = { name = "X-Plan", contains = "gold" }
target = { class = "premium" }
CONF
}
