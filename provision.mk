# Provisioning targets, included by the Makefile (which defines VENV, PY and the venv target).
#
#   make build                          render + validate + compile every board into build/<device>/
#   make flash DEVICE=lab-07 [FORCE=1]  MicroPython if the board runs another release, then its files
#   make upload DEVICE=lab-07           only the files that differ
#   make provision                      every board: flash when needed, upload what differs
#   make reprovision [RETRY=1]          after a config change: upload what differs to every board
#                                       (RETRY=1: only the boards that failed or were not connected)
#   make deploy                         the lab servers: mosquitto and the recorder
#   make lint-ansible                   ansible-lint (production profile) and a syntax check
#
# INVENTORY=inventory/<lab> picks the lab (default: the virtual demo lab). CHECK=1 adds
# --check --diff (show what would change, change nothing). BUILD_DIR moves build/. PLAYBOOK_ARGS
# passes anything else to ansible-playbook.
#
# Vault: a lab keeps its vault password out of git, in a file named by VAULT_PASSWORD_FILE or
# ANSIBLE_VAULT_PASSWORD_FILE (otherwise Ansible asks). The example and demo inventories ship
# their published demo password in <inventory>/demo-vault-password.txt, used when present.

INVENTORY ?= inventory/demo
PLAYBOOK_ARGS ?=
VAULT_PASSWORD_FILE ?= $(wildcard $(INVENTORY)/demo-vault-password.txt)
# Build output, per-board results of the last run (build/provision/) and the retry file.
BUILD_DIR ?= build
PROVISION_RUN_DIR = $(BUILD_DIR)/provision
RETRY_FILE = $(BUILD_DIR)/reprovision.retry

VAULT_ARGS = $(if $(VAULT_PASSWORD_FILE),--vault-password-file $(VAULT_PASSWORD_FILE),$(if $(ANSIBLE_VAULT_PASSWORD_FILE),,--ask-vault-pass))
PLAYBOOK = $(VENV)/bin/ansible-playbook site.yml -i $(INVENTORY) $(VAULT_ARGS) $(if $(CHECK),--check --diff) \
	-e '{"labfleet_build_dir": "$(abspath $(BUILD_DIR))"}' $(PLAYBOOK_ARGS)
FLEET_SUMMARY = $(PY) roles/board_files/files/fleet_summary.py --run-dir $(PROVISION_RUN_DIR) --retry-file $(RETRY_FILE)

# Run the playbook on boards, then always print the per-board table and write the retry file.
# Fails if the playbook or any board failed. $(2): a shell guard run first (it may `exit 0`).
define boards_run
	@$(2) rm -rf $(PROVISION_RUN_DIR); rc=0; \
	$(PLAYBOOK) $(1) || rc=$$?; \
	echo; \
	$(FLEET_SUMMARY) || { s=$$?; [ $$rc -ne 0 ] || rc=$$s; }; \
	exit $$rc
endef

define require_device
	@test -n "$(DEVICE)" || { echo "usage: make $@ DEVICE=<board name in $(INVENTORY)>"; exit 2; }
endef

.PHONY: build flash upload provision reprovision deploy lint-ansible

build: venv ## render, validate and compile every board's files into build/<device>/
	$(PLAYBOOK) --tags build

flash: venv ## MicroPython (if another release runs) + files on one board: DEVICE=x [FORCE=1]
	$(require_device)
	$(call boards_run,--tags build$(,)flash$(,)upload --limit $(DEVICE) $(if $(FORCE),-e '{"board_flash_force": true}'))

upload: venv ## upload the files that differ to one board: DEVICE=x
	$(require_device)
	$(call boards_run,--tags build$(,)upload --limit $(DEVICE))

provision: venv ## every board: flash MicroPython when needed, upload what differs, summary table
	$(call boards_run,--tags build$(,)flash$(,)upload)

reprovision: venv ## every board in parallel: upload what changed, summary table, retry file [RETRY=1]
ifdef RETRY
	$(call boards_run,--tags build$(,)upload --limit @$(RETRY_FILE),\
	  if [ ! -s $(RETRY_FILE) ]; then echo "nothing to retry: $(RETRY_FILE) lists no board"; exit 0; fi; \
	  echo "retrying: $$(tr '\n' ' ' < $(RETRY_FILE))";)
else
	$(call boards_run,--tags build$(,)upload)
endif

deploy: venv ## the lab servers: mosquitto (users, ACL, persistence) and the recorder service
	$(PLAYBOOK) --tags servers

lint-ansible: venv ## ansible-lint (production profile) and ansible-playbook --syntax-check
	$(VENV)/bin/ansible-lint --profile production site.yml roles
	$(VENV)/bin/ansible-playbook site.yml -i inventory/demo --syntax-check
	$(VENV)/bin/ansible-playbook site.yml -i inventory/example --syntax-check

# A literal comma inside $(call ...) arguments.
, := ,
