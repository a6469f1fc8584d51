# The two commands of the README: `make run` and `make test`. Each does its own set-up.
PYTHON ?= python3
CONFIG ?= config/netswapd.toml

.PHONY: run test deps install-python bench clean

# Run the daemon on the embedded default config (needs root for /var/lib and /run).
run: install-python
	$(PYTHON) -m netswap --config $(CONFIG)

# The whole test suite, real clients included; installs what it needs first.
test: deps
	$(PYTHON) -m pytest -q --durations=25 tests

deps:
	PYTHON=$(PYTHON) .ci/install-deps

install-python:
	$(PYTHON) -m pip install -q -e .

bench: deps
	$(PYTHON) bench/fio_matrix.py
	$(PYTHON) bench/swap_storm.py
	$(PYTHON) bench/nfs_bench.py

clean:
	rm -rf build *.egg-info daemon/*.egg-info daemon/netswap/_pool*.so daemon/netswap/_pool.c

# make install: netswapd as a systemd service -------------------------------------------------
# The package goes into $(PYTHON)'s environment (not editable: a service must not run from a
# checkout), netswapd and netswapctl into $(BINDIR), the unit into $(UNITDIR), the default
# config into $(SYSCONFDIR)/netswapd/ unless there is one already. systemctl is left to the
# operator (the steps are printed). DESTDIR stages everything under a root, for packaging:
# the package with pip --root, without its dependencies, which the target system provides.
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
SYSCONFDIR ?= /etc
# systemd reads units from /etc/systemd/system whatever SYSCONFDIR is.
UNITDIR ?= /etc/systemd/system
# Where pip puts $(PYTHON)'s commands and packages: /usr/local/bin and
# /usr/local/lib/python3.X/dist-packages for Debian's python3 run as root, <venv>/... in a
# virtualenv. When that is not $(BINDIR), $(BINDIR) gets symlinks, the paths the unit names.
PY_SCRIPTS = $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
PY_PURELIB = $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
# Debian's python3 is EXTERNALLY-MANAGED (PEP 668): pip refuses to install into it outside a
# virtualenv unless told to, and installing into it is what make install is for. Set
# PIP_INSTALL_FLAGS= to decide otherwise (or PYTHON=<venv>/bin/python3).
PIP_INSTALL_FLAGS ?= $(shell $(PYTHON) -c 'import os, sys, sysconfig; \
	marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"); \
	managed = sys.prefix == sys.base_prefix and os.path.exists(marker); \
	print("--break-system-packages" if managed else "")')

.PHONY: install install-package install-files

install: install-package install-files
	@echo
	@echo "netswapd is installed. Next:"
	@echo "  1. edit $(SYSCONFDIR)/netswapd/netswapd.toml (nbd.listen: the address facing your nodes)"
	@echo "  2. $(BINDIR)/netswapd check-config $(SYSCONFDIR)/netswapd/netswapd.toml"
	@echo "  3. systemctl daemon-reload && systemctl enable --now netswapd"
	@echo "  4. systemctl status netswapd    (its status line: exports, swap nodes, pool)"
	@echo "  5. so that nodes wait through a restart instead of being refused: give"
	@echo "     $(UNITDIR)/netswapd.socket the addresses of nbd.listen, then"
	@echo "     systemctl enable --now netswapd.socket"

install-package:
	$(PYTHON) -m pip install $(PIP_INSTALL_FLAGS) \
		$(if $(DESTDIR),--root "$(DESTDIR)" --ignore-installed --no-deps --no-warn-script-location) .

# Everything but the package: the commands' paths, the units (the service with this PREFIX
# and SYSCONFDIR written into it) and the config, which is never replaced.
install-files:
	install -d -m 0755 "$(DESTDIR)$(BINDIR)" "$(DESTDIR)$(UNITDIR)" "$(DESTDIR)$(SYSCONFDIR)/netswapd"
	@scripts="$(PY_SCRIPTS)"; purelib="$(PY_PURELIB)"; \
	if [ "$$scripts" != "$(BINDIR)" ]; then \
		for command in netswapd netswapctl; do \
			echo "ln -sfn $$scripts/$$command $(DESTDIR)$(BINDIR)/$$command"; \
			ln -sfn "$$scripts/$$command" "$(DESTDIR)$(BINDIR)/$$command" || exit 1; \
		done; \
	fi; \
	case "$$scripts:$$purelib" in /root/*|/home/*|/run/user/*|*:/root/*|*:/home/*|*:/run/user/*) \
		echo "warning: $(PYTHON) installs under $$purelib, which the unit's ProtectHome=yes" \
		     "hides from the service: netswapd will not start. Install with a python3 outside" \
		     "/root and /home (make install PYTHON=/usr/bin/python3)." >&2;; \
	esac
	sed -e 's|/usr/local/bin/|$(BINDIR)/|g' -e 's|/etc/netswapd/|$(SYSCONFDIR)/netswapd/|g' \
		systemd/netswapd.service > "$(DESTDIR)$(UNITDIR)/.netswapd.service.new"
	chmod 0644 "$(DESTDIR)$(UNITDIR)/.netswapd.service.new"
	mv -f "$(DESTDIR)$(UNITDIR)/.netswapd.service.new" "$(DESTDIR)$(UNITDIR)/netswapd.service"
	install -m 0644 systemd/netswapd.socket "$(DESTDIR)$(UNITDIR)/netswapd.socket"
	@config="$(DESTDIR)$(SYSCONFDIR)/netswapd/netswapd.toml"; \
	if [ -e "$$config" ]; then \
		echo "kept $$config: an operator's config is never replaced" \
		     "(the default is config/netswapd.toml)"; \
	else \
		echo "install -m 0644 config/netswapd.toml $$config"; \
		install -m 0644 config/netswapd.toml "$$config"; \
	fi
